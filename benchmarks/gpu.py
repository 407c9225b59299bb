"""The GPU checks of issues 18 and 23 in one run: bf16, LoRA, QLoRA (--load-in-4bit) and gradient
checkpointing on classify, generate and translate; peak GPU memory and speed of each; the
adapter runs through predict, merge and generate; FSDP (Accelerate, one process) training,
checkpointing, resuming and saving a model that plain transformers loads.

    python benchmarks/gpu.py [--data ../shared/data] [--out benchmarks/out/gpu] [--smoke]

Models are built from configs (random weights: speed and memory, not quality): a BERT-base shape
(12 x 768) for classify, GPT-2 124M (block 512) for generate, a 6-layer 512-wide Marian for
translate. Each run is timed by llmkit itself (metrics.json); peak GPU memory is
torch.cuda.max_memory_allocated over the run, reset before each. --smoke: tiny sizes on the CPU,
to check this script before spending GPU time. Writes OUT/gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def models(args: argparse.Namespace) -> dict[str, Path]:
    from causal_lm import save_gpt2
    from precision import build_model
    from seq2seq import save_model

    small = args.smoke
    found = {"bert": args.out / "bert", "gpt2": args.out / "gpt2", "marian": args.out / "marian"}
    build_model(found["bert"], 2 if small else 12, 64 if small else 768)
    text = (args.data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    save_gpt2(found["gpt2"], text, **(dict(n_layer=2, n_embd=64, n_head=2) if small else {}))
    pairs = [json.loads(x)["translation"] for x in
             (args.data / "bible-en-es/old-testament.jsonl").read_text().splitlines()[:4000]]
    marian = argparse.Namespace(vocab=8000, width=64 if small else 512, layers=2 if small else 6)
    save_model([p["en"] for p in pairs] + [p["es"] for p in pairs], "marian", marian,
               found["marian"])
    return found


def data(args: argparse.Namespace) -> dict[str, Path]:
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    sst = (args.data / "sst2/train.tsv").read_text().splitlines()
    rows = 256 if args.smoke else 4000
    (folder / "sst2-train.tsv").write_text("\n".join(sst[:rows + 1]) + "\n")
    (folder / "sst2-dev.tsv").write_text("\n".join(sst[:1] + sst[-500:]) + "\n")
    text = (args.data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    (folder / "lm-train.txt").write_text(text[:len(text) * 9 // 10])
    (folder / "lm-valid.txt").write_text(text[len(text) * 9 // 10:][:40_000])
    bible = (args.data / "bible-en-es/old-testament.jsonl").read_text().splitlines()
    (folder / "mt-train.jsonl").write_text("\n".join(bible[:rows]) + "\n")
    (folder / "mt-dev.jsonl").write_text("\n".join(bible[-200:]) + "\n")
    return {p.stem: p for p in folder.iterdir()}


def runs(args: argparse.Namespace, m: dict[str, Path], d: dict[str, Path]) -> dict[str, dict]:
    """Name -> (task, overrides) of every measured run."""
    bf16 = "no" if args.smoke else "bf16"
    steps = 10 if args.smoke else 40
    classify = {"model": str(m["bert"]), "data.train": str(d["sst2-train"]),
                "data.validation": str(d["sst2-dev"]), "data.max_length": 128,
                "train.batch_size": 32, "train.epochs": 1, "train.logging_steps": 25}
    generate = {"model": str(m["gpt2"]), "data.train": str(d["lm-train"]),
                "data.validation": str(d["lm-valid"]), "data.sample_by": "document",
                "data.block_size": 512, "train.batch_size": 8, "train.max_steps": steps,
                "train.logging_steps": 10}
    translate = {"model": str(m["marian"]), "data.train": str(d["mt-train"]),
                 "data.validation": str(d["mt-dev"]), "data.source_lang": "en",
                 "data.target_lang": "es", "data.max_length": 128,
                 "data.max_target_length": 128, "data.max_new_tokens": 32,
                 "train.batch_size": 32, "train.epochs": 1, "train.logging_steps": 25}
    lora = {"adapter.lora": True, "train.learning_rate": 5e-4}
    qlora = {**lora, "adapter.load_in_4bit": True}
    gc_ = {"train.gradient_checkpointing": True}
    found = {
        "classify full fp32": ("classify", {**classify, "train.mixed_precision": "no"}),
        "classify full bf16": ("classify", {**classify, "train.mixed_precision": bf16}),
        "classify lora bf16": ("classify", {**classify, **lora, "train.mixed_precision": bf16}),
        "classify qlora+gc bf16": ("classify", {**classify, **qlora, **gc_,
                                                "train.mixed_precision": bf16}),
        "generate full fp32": ("generate", {**generate, "train.mixed_precision": "no"}),
        "generate full bf16": ("generate", {**generate, "train.mixed_precision": bf16}),
        "generate full+gc bf16": ("generate", {**generate, **gc_,
                                               "train.mixed_precision": bf16}),
        "generate lora bf16": ("generate", {**generate, **lora, "train.mixed_precision": bf16}),
        "generate lora+gc bf16": ("generate", {**generate, **lora, **gc_,
                                               "train.mixed_precision": bf16}),
        "generate qlora bf16": ("generate", {**generate, **qlora,
                                             "train.mixed_precision": bf16}),
        "generate qlora+gc bf16": ("generate", {**generate, **qlora, **gc_,
                                                "train.mixed_precision": bf16}),
        "translate full bf16": ("translate", {**translate, "train.mixed_precision": bf16}),
        "translate lora bf16": ("translate", {**translate, **lora,
                                              "train.mixed_precision": bf16}),
    }
    if args.smoke:  # no 4-bit layers on a CPU
        found = {k: v for k, v in found.items() if "qlora" not in k}
    return found


def measure(name: str, task: str, overrides: dict, args: argparse.Namespace) -> dict:
    import torch

    from llmkit.run.finetune import finetune
    from llmkit.run.preflight import plan
    from llmkit.tasks import load_config

    out = args.out / "runs" / name.replace(" ", "-").replace("+", "-")
    estimate = plan(load_config(task, None, {**overrides, "output": str(out)}))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    start = time.perf_counter()
    finetune(load_config(task, None, {**overrides, "output": str(out)}), overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    run, final = metrics["run"], metrics["final"]
    return {"task": task, "overrides": overrides, "output": str(out),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "allocated_before_mb": round(before / 2**20, 1),
            **{k: run.get(k) for k in ("train_samples_per_second", "train_tokens_per_second",
                                       "peak_gpu_memory_mb", "peak_rss_mb",
                                       "trainable_parameters", "total_parameters")},
            "eval_loss": final.get("eval_loss"), "train_loss": final.get("train_loss"),
            "estimated_peak_memory_mb": estimate["estimated_peak_memory_mb"],
            "memory_parts_mb": estimate["memory_parts_mb"]}


def cli(*argv: str) -> dict:
    """One llmkit command as a user types it: exit code and the output's last lines."""
    child = subprocess.run([sys.executable, "-m", "llmkit", *argv], capture_output=True,
                           text=True)
    return {"argv": " ".join(argv), "rc": child.returncode,
            "stdout": child.stdout[-1500:], "stderr": child.stderr[-1500:]}


def adapter_uses(results: dict, d: dict[str, Path], args: argparse.Namespace) -> dict:
    """The 4-bit adapter runs through predict, merge (then plain transformers) and generate."""
    found = {}
    quant = results.get("classify qlora+gc bf16", results.get("classify lora bf16"))
    if not quant or "output" not in quant:
        return {"skipped": "no classify adapter run"}
    run = quant["output"]
    predictions = args.out / "predictions.jsonl"
    found["predict"] = cli("predict", "--model", run, "--input", str(d["sst2-dev"]),
                           "--output", str(predictions))
    merged = args.out / "merged"
    found["merge"] = cli("merge", run, "--output", str(merged))
    if found["predict"]["rc"] == 0 and found["merge"]["rc"] == 0:
        from transformers import pipeline

        texts = [line.split("\t")[0] for line in d["sst2-dev"].read_text().splitlines()[1:]]
        plain = pipeline("text-classification", model=str(merged), device=0 if not args.smoke
                         else -1)(texts, batch_size=64)
        ours = [json.loads(x) for x in predictions.read_text().splitlines()]
        found["merged_pipeline_agrees"] = sum(a["label"] == b["label"]
                                              for a, b in zip(plain, ours, strict=True))
        found["rows"] = len(ours)
    generated = results.get("generate qlora+gc bf16", results.get("generate lora bf16"))
    if generated and "output" in generated:
        found["generate"] = cli("generate", "--model", generated["output"], "--prompt",
                                "ROMEO:", "--max-new-tokens", "16")
    found["dry_run"] = cli("finetune", "classify", "--model", str(args.out / "bert"), "--train",
                           str(d["sst2-train"]), "--validation", str(d["sst2-dev"]),
                           "--output", str(args.out / "dry"), "--lora", "--load-in-4bit",
                           "--mixed-precision", "bf16", "--dry-run=measure")
    return found


def fsdp(args: argparse.Namespace, m: dict[str, Path], d: dict[str, Path]) -> dict:
    """Training under `accelerate launch --use_fsdp` (FSDP2, one process), each phase its own
    launch as a user runs them: a run; a run cut after its second checkpoint, then resumed,
    compared weight by weight with the first; a GPT-2 run (tied embeddings)."""
    if args.smoke:
        return {"skipped": "Accelerate refuses FSDP without a GPU"}
    from safetensors.torch import load_file

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
              "--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "bf16",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    found: dict = {}
    for phase in ("steady", "cut", "resume", "causal"):
        child = subprocess.run([*launch, __file__, "--fsdp-child", phase, "--out",
                                str(args.out), "--data", str(args.data)], capture_output=True,
                               text=True, timeout=300)
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        found[phase] = (json.loads(lines[-1][7:]) if lines else
                        {"rc": child.returncode, "stderr": child.stderr[-3000:]})
        print("fsdp", phase, json.dumps(found[phase])[:1500], flush=True)
    runs = [args.out / "fsdp" / n / "model.safetensors" for n in ("steady", "cut")]
    if all(r.is_file() for r in runs):
        a, b = (load_file(r) for r in runs)
        found["same_keys"] = a.keys() == b.keys()
        found["max_abs_weight_difference"] = max(
            float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return found


def fsdp_child(args: argparse.Namespace) -> None:
    """One phase of the FSDP check, in a process of its own."""
    import transformers

    from llmkit.run import checkpoint
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    small, d, phase = args.out / "bert-small", args.out / "data", args.fsdp_child
    if not small.is_dir():
        from precision import build_model

        build_model(small, 4, 256)
    rows = len((d / "sst2-train.tsv").read_text().splitlines()) - 1
    every = max(2, rows // 32 // 3)  # three checkpoints an epoch; the run is cut at the second
    name = {"resume": "cut"}.get(phase, phase)
    out = args.out / "fsdp" / name
    if phase == "causal":
        cfg = load_config("generate", None, {
            "model": str(args.out / "gpt2"), "output": str(out),
            "data.train": str(d / "lm-train.txt"), "data.validation": str(d / "lm-valid.txt"),
            "data.block_size": 256, "train.batch_size": 8, "train.max_steps": 20,
            "train.save_steps": 10, "train.mixed_precision": "bf16"})
    else:
        cfg = load_config("classify", None, {
            "model": str(small), "output": str(out), "data.train": str(d / "sst2-train.tsv"),
            "data.validation": str(d / "sst2-dev.tsv"), "data.max_length": 64,
            "train.batch_size": 32, "train.epochs": 2, "train.save_steps": every,
            "train.logging_steps": 20, "train.mixed_precision": "bf16"})
    found: dict = {}
    if phase == "cut":
        save = checkpoint.save_checkpoint

        def save_then_die(accelerator, out, state):
            path = save(accelerator, out, state)
            if state.global_step == 2 * every:
                raise KeyboardInterrupt
            return path

        checkpoint.save_checkpoint = save_then_die
        try:
            finetune(cfg, overwrite=True)
        except KeyboardInterrupt:
            found["checkpoints"] = [p.name for p in checkpoint.checkpoints(out)]
            found["files"] = sorted(str(p.relative_to(out / "checkpoints"))
                                    for p in (out / "checkpoints").rglob("*") if p.is_file())
    else:
        finetune(cfg, resume=phase == "resume", overwrite=phase != "resume")
        metrics = json.loads((out / "metrics.json").read_text())
        auto = (transformers.AutoModelForCausalLM if phase == "causal"
                else transformers.AutoModelForSequenceClassification)
        found = {"final": metrics["final"], "run": metrics["run"],
                 "loads_in_transformers": type(auto.from_pretrained(out)).__name__}
    print("RESULT " + json.dumps(found, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BENCH.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "gpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", help="run only the measured runs whose name holds one of these "
                        "(comma-separated)")
    parser.add_argument("--fsdp-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.fsdp_child:
        return fsdp_child(args)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else "cpu", "versions": versions()}
    m, d = models(args), data(args)
    results: dict[str, dict] = {}
    for name, (task, overrides) in runs(args, m, d).items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        try:
            results[name] = measure(name, task, overrides, args)
        except BaseException as err:  # a benchmark: note it and go on with the next run
            results[name] = {"error": f"{type(err).__name__}: {err}",
                             "trace": traceback.format_exc()[-2500:]}
        print(name, json.dumps({k: v for k, v in results[name].items()
                                if k not in ("overrides", "trace")}), flush=True)
    report["runs"] = results
    for label, check in (("adapter_uses", lambda: adapter_uses(results, d, args)),
                         ("fsdp", lambda: fsdp(args, m, d))):
        try:
            report[label] = check()
        except BaseException as err:
            report[label] = {"error": f"{type(err).__name__}: {err}",
                             "trace": traceback.format_exc()[-2500:]}
        print(label, json.dumps(report[label], default=str)[:3000], flush=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{'run':28}{'samples/s':>11}{'tokens/s':>11}{'peak GPU MB':>13}{'eval loss':>11}"
          f"{'estimate MB':>13}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:28} error: {r['error'][:80]}")
            continue
        print(f"{name:28}{r['train_samples_per_second'] or 0:11.1f}"
              f"{r['train_tokens_per_second'] or 0:11.0f}{r['peak_gpu_memory_mb'] or 0:13.0f}"
              f"{r['eval_loss'] or 0:11.3f}{r['estimated_peak_memory_mb']:13.0f}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "accelerate", "peft", "datasets", "bitsandbytes",
                 "tokenizers", "typer"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    found["python"] = sys.version.split()[0]
    found["cuda_visible"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return found


if __name__ == "__main__":
    main()
