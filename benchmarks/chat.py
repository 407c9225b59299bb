"""Conversations: llmkit finetune generate vs TRL's SFTTrainer on the same chats, packed, the loss
on assistant turns only, each tool in its own process (its own peak RSS).

    python benchmarks/chat.py [--epochs 2] [--block 512] [--batch 8] [--lr 1e-3] [--seed 42]

The chats are built from ../shared/data/debian-qa: one conversation per package (a system
message, the package description with the first question, then its other questions), unanswerable
questions answered "I do not know.". The model is a random 4-layer 256-wide GPT-2 with a
byte-level BPE tokenizer trained on the chats, ChatML markers as special tokens and a ChatML
template with {% generation %} markers (TRL's assistant_only_loss needs them; llmkit reads them
too). Both tools pack conversations whole into blocks (best fit) and train the same epochs; the
assistant-token loss of both final models is measured the same way (llmkit's evaluation, packed
dev chats). Writes benchmarks/out/chat.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH.parents[1] / "shared" / "data" / "debian-qa"
OUT = BENCH / "out" / "chat"
TOOLS = ("llmkit", "TRL SFTTrainer")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
            "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chats(split: str) -> list[dict]:
    """One conversation per package of debian-qa's `split`."""
    articles = json.loads((DATA / f"{split}.json").read_text(encoding="utf-8"))["data"]
    talks = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            messages = [{"role": "system", "content": "You answer questions about Debian "
                         "packages from their description."}]
            for i, qa in enumerate(paragraph["qas"]):
                question = f"{paragraph['context']}\n\n{qa['question']}" if i == 0 \
                    else qa["question"]
                answer = qa["answers"][0]["text"] if qa["answers"] else "I do not know."
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]
            talks.append({"messages": messages})
    return talks


def prepare(args: argparse.Namespace) -> None:
    """The chat files and the random model with its tokenizer and template, once."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        (OUT / f"{split}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in chats(split)))
    text = [m["content"] for t in chats("train") for m in t["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>",
                                                                   "<|im_end|>"])
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=args.block, n_embd=256,
                               n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
                    ).save_pretrained(OUT / "model")
    tokenizer.save_pretrained(OUT / "model")


def run_llmkit(args: argparse.Namespace) -> tuple[Path, dict]:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    cfg = load_config("generate", None, {
        "model": str(OUT / "model"), "output": str(OUT / "llmkit-run"),
        "data.train": str(OUT / "train.jsonl"), "data.validation": str(OUT / "dev.jsonl"),
        "data.block_size": args.block, "train.epochs": args.epochs,
        "train.batch_size": args.batch, "train.learning_rate": args.lr,
        "train.seed": args.seed, "train.logging_steps": 10})
    out = finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return out, {"train_tokens_per_second": metrics["run"]["train_tokens_per_second"],
                 "steps": metrics["history"][-1]["step"]}


def run_trl(args: argparse.Namespace) -> tuple[Path, dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = OUT / "trl-run"
    tokenizer = AutoTokenizer.from_pretrained(OUT / "model")
    train = datasets.load_dataset("json", data_files=str(OUT / "train.jsonl"), split="train")
    config = SFTConfig(output_dir=str(out), max_length=args.block, packing=True,
                       assistant_only_loss=True, per_device_train_batch_size=args.batch,
                       num_train_epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
                       lr_scheduler_type="linear", save_strategy="no", report_to=[],
                       logging_steps=10, disable_tqdm=True, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(OUT / "model"),
                         args=config, train_dataset=train, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    seen = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    tokens = seen[-1] if seen else float("nan")
    return out, {"train_tokens_per_second": round(tokens / result.metrics["train_runtime"], 1),
                 "steps": result.global_step}


def one(tool: str, args: argparse.Namespace) -> None:
    from llmkit.inference.predict import score

    start = time.perf_counter()
    out, result = run_trl(args) if tool == TOOLS[1] else run_llmkit(args)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scored = score(str(out), str(OUT / "dev.jsonl"), task_name="generate",
                   columns={"messages_column": "messages"})  # the same measure for both
    result |= {"assistant_loss": math.log(scored["perplexity"]),
               "eval_tokens": scored["eval_tokens"]}
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tool:
        return one(args.tool, args)
    prepare(args)
    results = {}
    for tool in TOOLS:
        child = subprocess.run([sys.executable, __file__, f"--tool={tool}", "--epochs",
                                str(args.epochs), "--block", str(args.block), "--batch",
                                str(args.batch), "--lr", str(args.lr), "--seed",
                                str(args.seed)], capture_output=True, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode or not lines:
            raise SystemExit(f"{tool} failed:\n{child.stderr[-3000:]}")
        results[tool] = json.loads(lines[-1][7:])
        print(tool, results[tool], flush=True)
    ratio = (results[TOOLS[0]]["train_tokens_per_second"]
             / results[TOOLS[1]]["train_tokens_per_second"])
    print(f"tokens/s llmkit / TRL SFTTrainer: {ratio:.2f}")
    (OUT.parent / "chat.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                      "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
