"""A small GPT-2 on tinyshakespeare: llmkit vs transformers.Trainer (run_clm.py-style grouping).
One session, same settings; `run.py --task causal` alternates them over rounds, with a padded
one-line-per-example baseline too, and `run.py --task generate` times generation on its model.

    python benchmarks/causal_lm.py [--epochs 1] [--layers 6] [--width 384] [--block 256]
        [--mixed-precision bf16] [--data input.txt]

The last 10% of the lines of ../shared/data/tinyshakespeare/input.txt are the validation text.
The model is random-initialised from a GPT-2 config, with a byte-level BPE tokenizer trained on
the training text. Writes benchmarks/out/causal_lm.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
OUT = ROOT / "benchmarks" / "out" / "causal_lm"


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Train/validation files and a random GPT-2 with its own tokenizer, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    lines = DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    train, valid = OUT / "train.txt", OUT / "valid.txt"
    train.write_text("".join(lines[:cut]), encoding="utf-8")
    valid.write_text("".join(lines[cut:]), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(train)], trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.block, n_embd=args.width,
                        n_layer=args.layers, n_head=args.width // 64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = OUT / "model"
    GPT2LMHeadModel(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return train, valid, model


def save_gpt2(folder: Path, text: str, **shape: int) -> Path:
    """A random GPT-2 (its own sizes unless `shape` says otherwise; 1,024 positions) with a
    byte-level BPE of 8,000 words trained on `text`: the other benchmarks' causal model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)  # with GPT-2's own vocabulary the rows past the tokenizer's stay unused
    GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0, **shape)
                    ).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def run_llmkit(train: Path, valid: Path, model: Path, args: argparse.Namespace) -> dict:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    cfg = load_config("generate", None, {
        "model": str(model), "output": str(OUT / "llmkit-run"), "data.train": str(train),
        "data.validation": str(valid), "data.sample_by": "document",
        "data.block_size": args.block, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.learning_rate": args.lr,
        "train.warmup_ratio": 0.05, "train.logging_steps": 20, "train.seed": args.seed,
        "train.mixed_precision": args.mixed_precision})
    start = time.perf_counter()
    out = finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"perplexity": metrics["history"][-1]["perplexity"],
            "eval_tokens": metrics["history"][-1]["eval_tokens"],
            "train_tokens_per_second": metrics["run"]["train_tokens_per_second"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def previous_llmkit() -> dict:
    metrics = json.loads((OUT / "llmkit-run" / "metrics.json").read_text())
    return {"perplexity": metrics["history"][-1]["perplexity"],
            "eval_tokens": metrics["history"][-1]["eval_tokens"],
            "train_tokens_per_second": metrics["run"]["train_tokens_per_second"],
            "wall_seconds": float("nan")}


def run_trainer(train: Path, valid: Path, model: Path, args: argparse.Namespace) -> dict:
    """run_clm.py's recipe: text rows by line (line breaks kept), tokenized, concatenated and cut
    into blocks per 1000-row map batch; Trainer at its defaults otherwise."""
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    start = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": str(train), "validation": str(valid)},
                                keep_linebreaks=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokens = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

    def group(batch: dict) -> dict:
        joined = {k: sum(batch[k], []) for k in batch}
        total = len(joined["input_ids"]) // args.block * args.block
        blocks = {k: [v[i:i + args.block] for i in range(0, total, args.block)]
                  for k, v in joined.items()}
        blocks["labels"] = blocks["input_ids"].copy()
        return blocks

    blocks = tokens.map(group, batched=True)
    training = TrainingArguments(
        output_dir=str(OUT / "trainer-run"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, warmup_steps=0.05, seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=20,
        disable_tqdm=True, bf16=args.mixed_precision == "bf16")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model), args=training,
                      train_dataset=blocks["train"], data_collator=default_data_collator)
    result = trainer.train()
    # The model's own loss over the validation blocks (all full: block - 1 predicted tokens
    # each), not Trainer.evaluate: transformers 5.23 counts the unshifted labels of a model
    # whose class name lacks "ForCausalLM" (GPT2LMHeadModel has loss_type None), dividing by
    # 256 tokens per block where 255 are scored: eval_loss reads low by 1/256, perplexity ~2%.
    net, rows = trainer.model.eval(), torch.tensor(blocks["validation"]["input_ids"])
    device = next(net.parameters()).device
    with torch.inference_mode():
        loss = sum(net(input_ids=b.to(device), labels=b.to(device)).loss.item() * len(b)
                   for b in rows.split(args.batch_size)) / len(rows)
    return {"perplexity": math.exp(loss),
            "eval_tokens": len(blocks["validation"]) * (args.block - 1),
            "train_tokens_per_second": round(result.metrics["train_samples_per_second"]
                                             * args.block, 1),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def run_padded(train: Path, valid: Path, model: Path, args: argparse.Namespace) -> dict:
    """The naive baseline: one line of text per example, Trainer at its defaults with the stock
    language-modelling collator (each batch padded to its longest line, padding masked out of
    the loss). Throughput counts real tokens only; --padded-steps optimizer steps."""
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": str(train)}, keep_linebreaks=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.eos_token
    lines = raw["train"].filter(lambda r: bool(r["text"].strip())).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.block), batched=True,
        remove_columns=["text"])
    real_tokens = sum(len(ids) for ids in lines["input_ids"]) / len(lines)
    training = TrainingArguments(
        output_dir=str(OUT / "padded-run"), max_steps=args.padded_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, warmup_steps=0.05, seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=20,
        disable_tqdm=True, bf16=args.mixed_precision == "bf16")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model), args=training,
                      train_dataset=lines,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    return {"train_tokens_per_second": round(result.metrics["train_samples_per_second"]
                                             * real_tokens, 1),
            "mean_tokens_per_example": round(real_tokens, 1),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def parser() -> argparse.ArgumentParser:
    """The settings (run.py reads the defaults from here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--padded-steps", type=int, default=100,
                        help="optimizer steps of the one-line-per-example baseline (run.py)")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--skip-llmkit", action="store_true",
                        help="reuse the last llmkit run's metrics (same settings assumed)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--data", type=Path, help="another copy of tinyshakespeare/input.txt")
    return parser


def main() -> None:
    args = parser().parse_args()
    global DATA
    DATA = args.data or DATA
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is absent: the shared data folder must sit beside the checkout")
    OUT.mkdir(parents=True, exist_ok=True)
    train, valid, model = prepare(args)
    results = {"llmkit": previous_llmkit() if args.skip_llmkit
               else run_llmkit(train, valid, model, args)}
    if not args.skip_trainer:
        results["transformers.Trainer (run_clm grouping)"] = run_trainer(train, valid, model,
                                                                         args)
    print(f"{'':40}{'perplexity':>12}{'tokens/s':>12}{'wall s':>10}")
    for name, r in results.items():
        print(f"{name:40}{r['perplexity']:12.2f}{r['train_tokens_per_second']:12.1f}"
              f"{r['wall_seconds']:10.1f}")
    (OUT.parent / "causal_lm.json").write_text(json.dumps(
        {"args": vars(args), "results": results,
         "torch_threads": torch.get_num_threads(),
         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        indent=1, default=str))


if __name__ == "__main__":
    main()
