"""A small random-initialised Marian on the Bible (en -> es), or a BART-shaped model on Debian
package descriptions (summarize): llmkit vs transformers' Seq2SeqTrainer at its defaults, same
model, data and settings, in one session.

    python benchmarks/seq2seq.py translate [--train-rows 16000] [--epochs 2]
    python benchmarks/seq2seq.py summarize [--train-rows 4000] [--skip-trainer]

Translation: ../shared/data/bible-en-es/old-testament.jsonl, a seeded 500-verse dev slice held
out, a shared 8k BPE vocabulary trained on the training verses. Both tools train the same
steps (batch 32, AdamW, lr 1e-3, linear schedule with 10% warm-up), then generate the dev
translations greedily (same max new tokens) and are scored with sacrebleu's defaults. Writes
benchmarks/out/seq2seq-{task}.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"


def split_rows(path: Path, dev: int, train: int, folder: Path) -> tuple[Path, Path]:
    rows = path.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    files = folder / "train.jsonl", folder / "dev.jsonl"
    files[0].write_text("\n".join(rows[dev:dev + train]) + "\n", encoding="utf-8")
    files[1].write_text("\n".join(rows[:dev]) + "\n", encoding="utf-8")
    return files


def save_model(texts: list[str], family: str, args: argparse.Namespace, folder: Path) -> Path:
    """A shared BPE vocabulary trained on `texts` and a random encoder-decoder of `family`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["</s>", "<unk>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=args.vocab,
                                                       special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        model_max_length=512)
    kind = {"marian": "MarianConfig", "bart": "BartConfig"}[family]
    config = getattr(transformers, kind)(
        vocab_size=len(tokenizer), d_model=args.width, encoder_layers=args.layers,
        decoder_layers=args.layers, encoder_attention_heads=args.width // 64,
        decoder_attention_heads=args.width // 64, encoder_ffn_dim=4 * args.width,
        decoder_ffn_dim=4 * args.width, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=None,
        bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def options(task: str, args: argparse.Namespace) -> dict:
    return {"train.epochs": args.epochs, "train.batch_size": args.batch_size,
            "train.eval_batch_size": args.batch_size, "train.learning_rate": args.lr,
            "train.warmup_ratio": 0.1, "train.weight_decay": 0.01, "train.logging_steps": 50,
            "train.seed": args.seed, "train.group_by_length": not args.no_group_by_length,
            "data.max_length": 128 if task == "translate" else 256,
            "data.max_target_length": 128 if task == "translate" else 48,
            "data.max_new_tokens": args.max_new_tokens, "data.num_beams": 1}


def run_llmkit(task: str, model: Path, train: Path, dev: Path, args: argparse.Namespace,
               output: Path | None = None) -> dict:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    extra = ({"data.source_lang": "en", "data.target_lang": "es"} if task == "translate"
             else {"data.text_column": "document"})
    output = output or OUT / f"{task}-llmkit"
    cfg = load_config(task, None, {"model": str(model), "output": str(output),
                                   "data.train": str(train), "data.validation": str(dev),
                                   **extra, **options(task, args)})
    start = time.perf_counter()
    out = finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["history"][-1]
    keep = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "eval_loss")
    return {**{k: last[k] for k in keep if k in last},
            "train_samples_per_second": metrics["run"]["train_samples_per_second"],
            "eval_seconds": last["eval_seconds"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def run_trainer(model: Path, train: Path, dev: Path, args: argparse.Namespace,
                task: str = "translate") -> dict:
    """run_translation.py's (run_summarization.py's) preprocessing and Seq2SeqTrainer at its
    defaults (random order, the stock collator), then predict(predict_with_generate=True) on the
    dev rows: BLEU and chrF, or ROUGE (rouge-score, as llmkit scores it)."""
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from llmkit.scoring.metrics import rouge_scores, sacrebleu_score

    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files={"train": str(train), "dev": str(dev)})
    tokenizer = AutoTokenizer.from_pretrained(model)
    settings = options(task, args)

    def pairs(batch: dict) -> tuple[list[str], list[str]]:
        if task == "translate":
            return [p["en"] for p in batch["translation"]], [p["es"] for p in batch["translation"]]
        return batch["document"], batch["summary"]

    def encode(batch: dict) -> dict:
        sources, targets = pairs(batch)
        features = tokenizer(sources, max_length=settings["data.max_length"], truncation=True)
        features["labels"] = tokenizer(text_target=targets, truncation=True,
                                       max_length=settings["data.max_target_length"])["input_ids"]
        return features

    features = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    net = AutoModelForSeq2SeqLM.from_pretrained(model)
    training = Seq2SeqTrainingArguments(
        output_dir=str(OUT / f"{task}-trainer"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, warmup_steps=0.1, weight_decay=0.01,
        seed=args.seed, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50,
        disable_tqdm=True, predict_with_generate=True)
    trainer = Seq2SeqTrainer(model=net, args=training, train_dataset=features["train"],
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=net),
                             processing_class=tokenizer)
    result = trainer.train()
    began = time.perf_counter()
    predicted = trainer.predict(features["dev"], max_new_tokens=args.max_new_tokens,
                                num_beams=1)
    eval_seconds = time.perf_counter() - began
    # after the clock: a pass of our own, not part of Trainer's evaluation
    exact = token_mean_loss(net, features["dev"], DataCollatorForSeq2Seq(tokenizer, model=net),
                            args.batch_size)
    ids = predicted.predictions
    ids[ids < 0] = tokenizer.pad_token_id
    hypotheses = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    references = pairs(raw["dev"][:])[1]
    scores = ({"bleu": sacrebleu_score("bleu", hypotheses, [references], {}).value,
               "chrf": sacrebleu_score("chrf", hypotheses, [references], {}).value}
              if task == "translate"
              else {s.metric: s.value for s in rouge_scores(hypotheses, references)})
    return {**scores, "eval_loss": exact, "trainer_eval_loss": predicted.metrics["test_loss"],
            "train_samples_per_second": round(result.metrics["train_samples_per_second"], 2),
            "eval_seconds": round(eval_seconds, 2),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def token_mean_loss(net: Any, features: Any, collate: Any, batch_size: int) -> float:
    """The dev set's cross-entropy summed over its target tokens over their count: llmkit's
    eval_loss. (Trainer's own averages each batch's token mean over the rows, which differs.)"""
    import torch.nn.functional as F

    net.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = collate([features[i] for i in range(start, min(start + batch_size,
                                                                    len(features)))])
            logits = net(**batch).logits.float()
            labels = batch["labels"]
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def import_libraries() -> None:
    """What both evaluation workers import before their clocks start (wall_seconds then
    compares the work, not which tool happens to import a module first)."""
    import datasets  # noqa: F401
    import transformers

    transformers.MarianMTModel, transformers.Seq2SeqTrainer  # noqa: B018 - lazy modules load


def eval_llmkit(run: Path, dev: Path, args: argparse.Namespace) -> dict:
    """`llmkit eval --model RUN --data dev.jsonl`'s path: the run's settings (greedy, at most
    --max-new-tokens), batches of --batch-size sorted by length, loss and generation."""
    from llmkit.data.read import load_split
    from llmkit.inference.predict import outputs, prepare

    import_libraries()
    start = time.perf_counter()
    spec, data, net, tokenizer = prepare(str(run), None, None)
    features = spec.featurize(load_split(str(dev), "validation", None, "--data"), tokenizer,
                              net.config, data)
    began = time.perf_counter()
    arrays, order = outputs(spec, net, tokenizer, features, args.batch_size)
    result = spec.score(arrays, features.select(order), data, net.config, tokenizer)
    return {"bleu": result["bleu"], "chrf": result["chrf"],
            **decode_steps(arrays["generated"], tokenizer.pad_token_id, args.batch_size),
            "generated_tokens": result["generated_tokens"],  # llmkit's own figure
            "eval_seconds": round(time.perf_counter() - began, 2),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "predictions": result["predictions"]}


def decode_steps(ids: Any, pad: int, batch_size: int) -> dict:
    """What generation in batches of `batch_size` (rows in the order given) computed: every row
    of a batch takes a decoder step until the batch's longest output is done. `useful_share`:
    the generated tokens over those row-steps."""
    lengths = (ids[:, 1:] != pad).sum(-1)  # after the decoder start token
    chunks = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    steps = sum(len(chunk) * int(chunk.max()) for chunk in chunks)
    return {"generated_tokens": float(lengths.mean()), "decode_row_steps": steps,
            "useful_share": round(float(lengths.sum()) / steps, 3)}


def eval_trainer(run: Path, dev: Path, args: argparse.Namespace) -> dict:
    """The same checkpoint through run_translation.py's preprocessing and
    `Seq2SeqTrainer.predict(predict_with_generate=True)`: dataset order, the stock collator."""
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from llmkit.scoring.metrics import sacrebleu_score

    import_libraries()
    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files={"dev": str(dev)})["dev"]
    tokenizer = AutoTokenizer.from_pretrained(run)
    length = options("translate", args)["data.max_length"]
    features = raw.map(lambda b: tokenizer([p["en"] for p in b["translation"]],
                                           text_target=[p["es"] for p in b["translation"]],
                                           max_length=length, truncation=True),
                       batched=True, remove_columns=raw.column_names)
    net = AutoModelForSeq2SeqLM.from_pretrained(run)
    trainer = Seq2SeqTrainer(model=net, args=Seq2SeqTrainingArguments(
        output_dir=str(OUT / "translate-eval-trainer"), per_device_eval_batch_size=args.batch_size,
        report_to=[], disable_tqdm=True, predict_with_generate=True),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=net), processing_class=tokenizer)
    began = time.perf_counter()
    predicted = trainer.predict(features, max_new_tokens=args.max_new_tokens, num_beams=1)
    ids = predicted.predictions
    ids[ids < 0] = tokenizer.pad_token_id
    hypotheses = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    references = [[p["es"] for p in raw["translation"]]]
    bleu = sacrebleu_score("bleu", hypotheses, references, {}).value
    chrf = sacrebleu_score("chrf", hypotheses, references, {}).value
    eval_seconds = time.perf_counter() - began
    steps = decode_steps(ids, tokenizer.pad_token_id, args.batch_size)
    return {"bleu": bleu, "chrf": chrf, "generated_tokens": steps.pop("generated_tokens"), **steps,
            "eval_seconds": round(eval_seconds, 2),
            "wall_seconds": round(time.perf_counter() - start, 2), "predictions": hypotheses}


def prepare(args: argparse.Namespace, folder: Path) -> tuple[Path, Path, Path]:
    """The task's train and dev files (a seeded split) and a random model of its family with a
    BPE vocabulary trained on the training rows' both sides."""
    if args.task == "translate":
        train, dev = split_rows(DATA / "bible-en-es" / "old-testament.jsonl", args.dev_rows,
                                args.train_rows, folder)
        rows = [json.loads(line)["translation"] for line in train.read_text().splitlines()]
        texts = [r["en"] for r in rows] + [r["es"] for r in rows]
    else:
        train, dev = split_rows(DATA / "debian-descriptions" / "descriptions.jsonl",
                                args.dev_rows, args.train_rows, folder)
        rows = [json.loads(line) for line in train.read_text().splitlines()]
        texts = [r["document"] for r in rows] + [r["summary"] for r in rows]
    family = "marian" if args.task == "translate" else "bart"
    return train, dev, save_model(texts, family, args, folder / "model")


def seed_run(args: argparse.Namespace, trainer: bool) -> dict:
    """One tool's run for benchmarks/seeds.py (same data split and initial model for every seed;
    the seed sets the data order and dropout): eval loss, and BLEU and chrF or ROUGE, of the dev
    rows after the last epoch."""
    folder = OUT / f"seq2seq-seeds-{args.task}"
    train, dev, model = prepare(args, folder)
    result = (run_trainer(model, train, dev, args, args.task) if trainer
              else run_llmkit(args.task, model, train, dev, args, folder / "llmkit-run"))
    keep = ("eval_loss", "trainer_eval_loss", "bleu", "chrf", "rouge1", "rouge2", "rougeL",
            "train_samples_per_second")
    return {k: result[k] for k in keep if k in result}


def parser() -> argparse.ArgumentParser:
    """The settings (run.py reads the defaults from here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["translate", "summarize"])
    parser.add_argument("--train-rows", type=int, default=16000)
    parser.add_argument("--dev-rows", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--no-group-by-length", action="store_true", help="llmkit's option")
    return parser


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(torch.get_num_threads())
    train, dev, model = prepare(args, OUT / f"seq2seq-{args.task}")
    results = {"settings": vars(args), "threads": torch.get_num_threads(),
               "llmkit": run_llmkit(args.task, model, train, dev, args)}
    if not args.skip_trainer:
        results["Seq2SeqTrainer"] = run_trainer(model, train, dev, args, args.task)
        a, b = results["llmkit"], results["Seq2SeqTrainer"]
        results["ratio"] = {
            "train_samples_per_second": round(a["train_samples_per_second"]
                                              / b["train_samples_per_second"], 2),
            "eval_speedup": round(b["eval_seconds"] / a["eval_seconds"], 2)}
    (OUT / f"seq2seq-{args.task}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
