"""Preference tuning: llmkit finetune dpo vs TRL's DPOTrainer on the same pairs, from the same
conversation-tuned model, each run in its own process (its own peak RSS).

    python benchmarks/preference.py [--seeds 3] [--epochs 1] [--batch 8] [--lr 3e-4]
                                    [--beta 0.1] [--max-steps 0] [--train-pairs 0] [--dev-pairs 0]
    python benchmarks/preference.py --train-pairs 320 --dev-pairs 200   # 17 min on 2 CPU cores
    python benchmarks/preference.py --quick     # everything tiny, to try the script (~4 min)

At its defaults (2,400 pairs, 600 held out, 1 epoch, 3 seeds) about an hour on 2 CPU cores,
TRL's runs most of it; the SFT model's 10 minutes come once before.

1. SFT, once (cached under benchmarks/out/preference/): chat.py's debian-qa chats, its random
   4-layer 256-wide GPT-2 with a byte-level BPE tokenizer and a ChatML template, trained by
   `llmkit finetune generate` (assistant turns only; 3 epochs, about 10 min on 2 CPU cores)
   -> out/preference/sft.
2. Pairs (TRL's conversational format) from ../shared/data/debian-qa: prompt = [system, user:
   package description + question], chosen = the right answer ("I do not know." when the
   question has none), rejected = the answer to a question about another package (a seeded
   choice, a different text). train.json -> 2,400 training pairs, dev.json -> 600 held out
   (--train-pairs, --dev-pairs: the first N).
3. Before: the SFT model's implicit preference on the held-out pairs, the share where
   log p(chosen) > log p(rejected), summed over the reply tokens (DPO's own reward accuracy is 0
   before the first step: both rewards are 0).
   After: each tool's own held-out reward accuracy (llmkit: the last evaluation in
   metrics.json's history; TRL: trainer.evaluate()'s eval_rewards/accuracies, a mean of
   per-batch means), and the same figure measured here alike for both final models:
   log pi - log ref of the chosen reply > of the rejected one, ref being the SFT model.
4. Speed and memory: llmkit finetune dpo (its defaults, which batch rows of similar length) vs
   DPOTrainer at the same settings (sigmoid loss, beta, lr with a linear decay, no warm-up, no
   weight decay, clipping at 1, batch, epochs or max steps, max length, dropout off, fp32, no
   gradient checkpointing, logging every 50 steps, a frozen copy as the reference), one process
   per tool and seed, seeds 42, 43, ...: training pairs/s (each tool's
   train_samples_per_second; llmkit leaves out its evaluations and checkpoints, TRL's run
   evaluates only after train()) and peak RSS (getrusage in the process after training and
   the held-out evaluation; this parent process stays small, as a child's peak starts from
   its parent's). The load average at each run's end says how busy the machine was.
5. Memory with llmkit alone, at the first seed: the full run (a frozen copy as the reference) vs
   --precompute-ref and --lora (r 16, every linear layer, the adapters disabled as the
   reference); --no-group-by-length for the speed. The small model's peak is its activations and
   evaluation logits, not its 4.3M weights, so the variants run again on a random GPT-2 of
   GPT-2 small's shape (12 layers, 768 wide, 88M parameters; 16 pairs, 4 steps of 2 pairs),
   where the weights, their gradients and Adam's states fill the memory (its pairs/s are no
   speed figure: 4 steps, the first of which also allocates Adam's states).

Prints a table with the issue's targets (met or not); writes benchmarks/out/preference.json
(--quick: preference-quick.json, its files under out/preference/quick).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import chat  # noqa: E402  (benchmarks/chat.py: the chats, the model, the template)

OUT = BENCH / "out" / "preference"
TOOLS = ("llmkit", "TRL DPOTrainer")
VARIANTS = ("--precompute-ref", "--lora", "--no-group-by-length")  # llmkit, first seed
WIDE = "llmkit wide"  # the memory variants again, on a random GPT-2 of GPT-2 small's shape
WIDE_VARIANTS = ("", "--precompute-ref", "--lora")
WIDE_RUN = {"pairs": (16, 8), "batch": 2, "eval_batch": 8, "max_steps": 4}


def folder(args: argparse.Namespace) -> Path:
    return OUT / "quick" if args.quick else OUT


def pairs(split: str, seed: int = 0) -> list[dict]:
    """Preference pairs from chat.py's conversations of `split`: each question with its
    package description as the prompt, the right answer chosen, the answer to a question about
    another package rejected (a seeded choice among those whose text differs)."""
    talks = chat.chats(split)
    answers = [[m["content"] for m in t["messages"][2::2]] for t in talks]
    rng, rows = random.Random(seed), []
    for k, talk in enumerate(talks):
        system, first = talk["messages"][0], talk["messages"][1]["content"]
        context = first.rsplit("\n\n", 1)[0]
        for user, reply in zip(talk["messages"][1::2], talk["messages"][2::2], strict=True):
            question = user["content"].rsplit("\n\n", 1)[-1]
            while True:
                other = rng.randrange(len(talks) - 1)
                other += other >= k  # another package
                wrong = rng.choice(answers[other])
                if wrong != reply["content"]:
                    break
            rows.append({"prompt": [system, {"role": "user",
                                             "content": f"{context}\n\n{question}"}],
                         "chosen": [reply], "rejected": [{"role": "assistant",
                                                          "content": wrong}]})
    return rows


def sft(args: argparse.Namespace) -> Path:
    """The conversation-tuned start of every DPO run, trained once by llmkit (cached)."""
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    root = folder(args)
    settings = {"epochs": args.sft_epochs, "block": 512, "batch": 8, "lr": 1e-3, "seed": 0,
                "max_steps": 20 if args.quick else 0}
    out = root / "sft"
    saved = root / "sft-settings.json"
    if (out / "metrics.json").is_file() and saved.is_file() \
            and json.loads(saved.read_text()) == settings:
        return out
    chat.OUT = root  # chat.prepare writes the chats and the random model there
    chat.prepare(argparse.Namespace(**settings))
    cfg = load_config("generate", None, {
        "model": str(root / "model"), "output": str(out),
        "data.train": str(root / "train.jsonl"), "data.validation": str(root / "dev.jsonl"),
        "data.block_size": settings["block"], "train.epochs": settings["epochs"],
        "train.max_steps": settings["max_steps"], "train.batch_size": settings["batch"],
        "train.learning_rate": settings["lr"], "train.seed": settings["seed"],
        "train.logging_steps": 50})
    finetune(cfg, overwrite=True)
    (root / "sft-settings.json").write_text(json.dumps(settings))
    return out


def write_pairs(args: argparse.Namespace) -> tuple[Path, Path]:
    root = folder(args)
    files = []
    for split, limit in (("train", args.train_pairs), ("dev", args.dev_pairs)):
        rows = pairs(split)
        rows = rows[:limit] if limit else rows
        path = root / f"pairs-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        wide = rows[:WIDE_RUN["pairs"][split == "dev"]]
        (root / f"pairs-wide-{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in wide), encoding="utf-8")
        files.append(path)
    return files[0], files[1]


def wide_model(args: argparse.Namespace, model: Path) -> dict:
    """A random GPT-2 of GPT-2 small's shape (12 layers, 768 wide; 88M parameters with the SFT
    model's 4,000-word tokenizer), where the weights, not the activations, fill the memory
    (cached; --quick: 2 layers)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = folder(args) / "wide-model"
    config = {"n_positions": 256, "n_embd": 768, "n_layer": 2 if args.quick else 12,
              "n_head": 12}
    if not (out / "config.json").is_file() or any(
            json.loads((out / "config.json").read_text())[k] != v for k, v in config.items()):
        tokenizer = AutoTokenizer.from_pretrained(model)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0,
                                   **config)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return config


def reply_logps(model_dir: Path, path: Path, batch: int = 32) -> list[list[float]]:
    """[log p(chosen), log p(rejected)] of each pair in `path`, summed over the reply tokens, the
    conversations tokenized as TRL does (the prompt with the generation prompt, each reply where
    the renderings part)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def ids(messages: list[dict], prompt: bool = False) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return tok(text, add_special_tokens=False)["input_ids"]

    sequences = []  # (ids, reply start)
    for row in rows:
        p = ids(row["prompt"], True)
        for reply in (row["chosen"], row["rejected"]):
            full = ids(row["prompt"] + reply)
            n = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b),
                     min(len(p), len(full)))
            sequences.append((full, n))
    sums = []
    with torch.inference_mode():
        for i in range(0, len(sequences), batch):
            part = sequences[i:i + batch]
            longest = max(len(s) for s, _ in part)
            input_ids = torch.tensor([s + [0] * (longest - len(s)) for s, _ in part])
            mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s, _ in part])
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            logps = torch.gather(F.log_softmax(logits, -1), 2,
                                 input_ids[:, 1:, None]).squeeze(2)
            for row, (s, n) in enumerate(part):
                sums.append(float(logps[row, n - 1:len(s) - 1].sum()))
    return [sums[i:i + 2] for i in range(0, len(sums), 2)]


def common(args: argparse.Namespace) -> dict:
    """The settings both tools train at."""
    return {"batch": args.batch, "eval_batch": 32, "lr": args.lr, "epochs": args.epochs,
            "max_steps": args.max_steps, "beta": args.beta, "max_length": args.max_length,
            "logging_steps": 50}


def run_llmkit(args: argparse.Namespace, variant: str, seed: int, out: Path,
               wide: bool = False) -> dict:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    root, s = folder(args), common(args)
    if wide:
        s |= {k: v for k, v in WIDE_RUN.items() if k != "pairs"} | {"epochs": 1}
    name = "wide-" if wide else ""
    cfg = load_config("dpo", None, {
        "model": str(root / ("wide-model" if wide else "sft")), "output": str(out),
        "data.train": str(root / f"pairs-{name}train.jsonl"),
        "data.validation": str(root / f"pairs-{name}dev.jsonl"),
        "data.max_length": s["max_length"], "data.max_prompt_length": s["max_length"] - 1,
        "data.loss": "sigmoid", "data.beta": s["beta"],
        "data.precompute_ref": variant == "--precompute-ref",
        "adapter.lora": variant == "--lora",
        "train.group_by_length": variant != "--no-group-by-length",
        "train.epochs": s["epochs"], "train.max_steps": s["max_steps"],
        "train.batch_size": s["batch"], "train.eval_batch_size": s["eval_batch"],
        "train.learning_rate": s["lr"], "train.lr_scheduler": "linear",
        "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.max_grad_norm": 1.0,
        "train.mixed_precision": "no", "train.gradient_checkpointing": False,
        "train.seed": seed, "train.logging_steps": s["logging_steps"]})
    finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["history"][-1]
    return {"samples_per_second": metrics["run"]["train_samples_per_second"],
            "train_seconds": metrics["run"]["train_seconds"], "steps": last["step"],
            "accuracy": last["rewards/accuracies"], "margin": last["rewards/margins"],
            "accuracy_kept": metrics["final"]["rewards/accuracies"],
            "kept_step": metrics["final"]["step"],
            "own_peak_rss_mb": metrics["run"]["peak_rss_mb"],
            "trainable_parameters": metrics["run"]["trainable_parameters"]}


def run_trl(args: argparse.Namespace, seed: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    root, s = folder(args), common(args)
    tokenizer = AutoTokenizer.from_pretrained(root / "sft")
    train, dev = (datasets.load_dataset("json", data_files=str(root / f"pairs-{split}.jsonl"),
                                        split="train") for split in ("train", "dev"))
    config = DPOConfig(output_dir=str(out), loss_type=["sigmoid"], beta=s["beta"],
                       max_length=s["max_length"], per_device_train_batch_size=s["batch"],
                       per_device_eval_batch_size=s["eval_batch"], num_train_epochs=s["epochs"],
                       max_steps=s["max_steps"] or -1, learning_rate=s["lr"],
                       lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, seed=seed, disable_dropout=True, bf16=False,
                       fp16=False, gradient_checkpointing=False, save_strategy="no",
                       eval_strategy="no", report_to=[], logging_steps=s["logging_steps"],
                       disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "sft"), args=config,
                         train_dataset=train, eval_dataset=dev, processing_class=tokenizer)
    result = trainer.train()
    evaluated = trainer.evaluate()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    return {"samples_per_second": result.metrics["train_samples_per_second"],
            "train_seconds": result.metrics["train_runtime"], "steps": result.global_step,
            "accuracy": evaluated["eval_rewards/accuracies"],
            "margin": evaluated["eval_rewards/margins"],
            "gradient_checkpointing": trainer.model.is_gradient_checkpointing,
            "dtype": str(trainer.model.dtype)}


def prepare(args: argparse.Namespace) -> dict:
    """The SFT model (cached), the pair files, and the SFT model's log-probabilities of the
    held-out pairs (the reference of the measure after DPO)."""
    began = time.perf_counter()
    model = sft(args)
    sft_seconds = time.perf_counter() - began
    train, dev = write_pairs(args)
    wide = wide_model(args, model)
    ref = reply_logps(model, dev)
    (folder(args) / "sft-dev-logps.json").write_text(json.dumps(ref))
    return {"before_accuracy": statistics.mean(c > r for c, r in ref),
            "train_pairs": len(train.read_text().splitlines()), "dev_pairs": len(ref),
            "sft_seconds": round(sft_seconds, 1), "wide_model": wide,
            "sft_metrics": json.loads((model / "metrics.json").read_text())["final"]}


def one(spec: str, args: argparse.Namespace) -> None:
    """One run in this process (spec: tool:variant:seed, or prepare); prints its figures as
    JSON."""
    if spec == "prepare":
        print("RESULT " + json.dumps(prepare(args)), flush=True)
        return
    tool, variant, seed = spec.split(":")
    name = {TOOLS[1]: "trl", WIDE: "wide"}.get(tool, "llmkit")
    out = folder(args) / f"{name}{variant}-{seed}"
    start = time.perf_counter()
    result = run_trl(args, int(seed), out) if tool == TOOLS[1] \
        else run_llmkit(args, variant, int(seed), out, wide=tool == WIDE)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["load_average"] = os.getloadavg()[0]  # other work on the machine, at the end
    if tool == WIDE:  # memory only: its weights are not kept (338 MB a run)
        shutil.rmtree(out)
    if not variant and tool in TOOLS:  # the same measure of both tools' models (after the peak)
        ref = json.loads((folder(args) / "sft-dev-logps.json").read_text())
        policy = reply_logps(out, folder(args) / "pairs-dev.jsonl")
        result["measured_accuracy"] = statistics.mean(
            (p[0] - r[0]) > (p[1] - r[1]) for p, r in zip(policy, ref, strict=True))
    print("RESULT " + json.dumps(result), flush=True)


def child(spec: str, argv: list[str]) -> dict:
    began = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, *argv, "--child", spec], capture_output=True,
                         text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{spec} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    result = json.loads(lines[-1][7:])
    print(f"{spec} ({time.perf_counter() - began:.0f} s): {result}", flush=True)
    return result


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def shown(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def summarize(runs: dict, seeds: list[int], before: float) -> dict:
    """Per tool over the seeds (mean, min, max), the speed ratios and the issue's targets."""
    summary = {tool: {name: spread([runs[f"{tool}::{s}"][key] for s in seeds if key in
                                    runs[f"{tool}::{s}"]])
                      for name, key in (("accuracy", "accuracy"),
                                        ("measured_accuracy", "measured_accuracy"),
                                        ("pairs_per_second", "samples_per_second"),
                                        ("peak_rss_mb", "peak_rss_mb"))} for tool in TOOLS}
    ratios = [runs[f"{TOOLS[0]}::{s}"]["samples_per_second"]
              / runs[f"{TOOLS[1]}::{s}"]["samples_per_second"] for s in seeds]
    mine, theirs = summary[TOOLS[0]], summary[TOOLS[1]]
    full, wide = (runs[f"{tool}::{seeds[0]}"]["peak_rss_mb"] for tool in (TOOLS[0], WIDE))
    targets = {
        "held-out reward accuracy after >= 0.85 (llmkit, seed mean)":
            mine["accuracy"]["mean"] >= 0.85,
        "llmkit's accuracy mean within TRL's seed range (own figures)":
            theirs["accuracy"]["min"] <= mine["accuracy"]["mean"] <= theirs["accuracy"]["max"],
        "llmkit's accuracy mean within TRL's seed range (measured here)":
            theirs["measured_accuracy"]["min"] <= mine["measured_accuracy"]["mean"]
            <= theirs["measured_accuracy"]["max"],
        "pairs/s >= 1.3x TRL's (mean of the per-seed ratios)": statistics.mean(ratios) >= 1.3,
        "--lora peak RSS < full": runs[f"llmkit:--lora:{seeds[0]}"]["peak_rss_mb"] < full,
        "--precompute-ref peak RSS < full (frozen copy)":
            runs[f"llmkit:--precompute-ref:{seeds[0]}"]["peak_rss_mb"] < full,
        "wide: --lora peak RSS < full": runs[f"{WIDE}:--lora:{seeds[0]}"]["peak_rss_mb"] < wide,
        "wide: --precompute-ref peak RSS < full (frozen copy)":
            runs[f"{WIDE}:--precompute-ref:{seeds[0]}"]["peak_rss_mb"] < wide}
    return {"before_accuracy": before, "summary": summary, "speed_ratios": ratios,
            "speed_ratio": statistics.mean(ratios), "targets": targets}


def table(report: dict) -> None:
    runs, result = report["runs"], report["result"]
    print(f"\n{report['train_pairs']} training pairs, {report['dev_pairs']} held-out; "
          f"settings {json.dumps(report['settings'])}")
    print(f"before, the SFT model: log p(chosen) > log p(rejected) on the held-out pairs: "
          f"{result['before_accuracy']:.3f}")
    print(f"{'run':<30}{'seed':>5}{'acc (own)':>10}{'acc (here)':>11}{'margin':>8}"
          f"{'steps':>6}{'pairs/s':>9}{'peak RSS MB':>12}{'load':>6}")
    for key, r in runs.items():
        tool, variant, seed = key.split(":")
        print(f"{tool + (' ' + variant if variant else ''):<30}{seed:>5}{r['accuracy']:>10.3f}"
              f"{r.get('measured_accuracy', float('nan')):>11.3f}{r['margin']:>8.2f}"
              f"{r['steps']:>6}{r['samples_per_second']:>9.2f}{r['peak_rss_mb']:>12.0f}"
              f"{r['load_average']:>6.1f}")
    for tool, s in result["summary"].items():
        print(f"{tool}, mean [min, max] over seeds: accuracy {shown(s['accuracy'])}, measured "
              f"here {shown(s['measured_accuracy'])}; pairs/s {shown(s['pairs_per_second'], 2)};"
              f" peak RSS MB {shown(s['peak_rss_mb'], 0)}")
    print(f"pairs/s llmkit / TRL DPOTrainer: {result['speed_ratio']:.2f} "
          f"(per seed: {', '.join(f'{x:.2f}' for x in result['speed_ratios'])})")
    for target, met in result["targets"].items():
        print(f"{'met    ' if met else 'NOT MET'}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, help="seeds 42, 43, ... per tool (default 3; "
                        "--quick: 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=0, help="0: --epochs decide")
    parser.add_argument("--max-length", type=int, default=256, help="prompt + reply tokens "
                        "(no pair reaches 256)")
    parser.add_argument("--train-pairs", type=int, default=0, help="the first N; 0: all (2,400)")
    parser.add_argument("--dev-pairs", type=int, default=0, help="the first N; 0: all (600)")
    parser.add_argument("--sft-epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny, to try the script: 20 "
                        "SFT steps, 48/32 pairs, 3 DPO steps, 1 seed (out/preference/quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args()
    if args.quick:
        args.max_steps = args.max_steps or 3
        args.train_pairs, args.dev_pairs = args.train_pairs or 48, args.dev_pairs or 32
    args.seeds = args.seeds or (1 if args.quick else 3)
    if args.child:
        return one(args.child, args)
    began = time.perf_counter()  # this process stays small: what a child starts from counts
    prepared = child("prepare", argv)  # in its peak RSS (Linux carries it over exec)
    seeds = [42 + i for i in range(args.seeds)]
    runs = {}
    for seed in seeds:
        for tool in TOOLS:
            runs[f"{tool}::{seed}"] = child(f"{tool}::{seed}", argv)
    for tool, variants in ((TOOLS[0], VARIANTS), (WIDE, WIDE_VARIANTS)):
        for variant in variants:
            runs[f"{tool}:{variant}:{seeds[0]}"] = child(f"{tool}:{variant}:{seeds[0]}", argv)
    report = {"args": vars(args), "settings": common(args), **prepared,
              "result": summarize(runs, seeds, prepared["before_accuracy"]), "runs": runs,
              "wall_seconds": round(time.perf_counter() - began, 1)}
    (OUT.parent / f"preference{'-quick' if args.quick else ''}.json").write_text(
        json.dumps(report, indent=1))
    table(report)
    print(f"{report['wall_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
