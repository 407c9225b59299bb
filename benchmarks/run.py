"""One entry point for the side-by-side benchmarks: llmkit and the reference tool alternate
(A B A B ...), each run in its own process (so each pays its own start-up and reports its own
peak memory), same model, data, settings and optimizer steps, a different seed per round (the
same for every tool within a round); medians over the rounds.

    python benchmarks/run.py --task classify [--rounds 3]
    python benchmarks/run.py --task causal | translate | translate-eval | generate | eval
    python benchmarks/run.py --task classify --mixed-precision bf16 --model F --data F  # a GPU

Options run.py does not know go to the task's script (classify.py, causal_lm.py, seq2seq.py).
On a GPU, or with --mixed-precision bf16, the table goes under its own marker, and the matmul
peak is measured on that device in that precision.

Prints a table and writes it into benchmarks/RESULTS.md between this task's markers, with the
machine (cores, threads, the fp32 matmul peak measured in the same run) and library versions.
MFU = model FLOPs per second / that peak, with model FLOPs per sample = 6·N·tokens +
12·layers·width·tokens² (N = non-embedding parameters; real tokens, padding not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
RESULTS = BENCH / "RESULTS.md"
TOOLS = {"classify": ("llmkit", "Trainer"),
         "causal": ("llmkit", "Trainer", "Trainer, one padded line per example"),
         "translate": ("llmkit", "Seq2SeqTrainer"),
         "translate-eval": ("llmkit", "Seq2SeqTrainer.predict"),
         "generate": ("llmkit", "model.generate"),
         "eval": ("llmkit", "sacrebleu CLI")}
# settings that differ from the scripts' own defaults (shorter runs, same steps for both tools)
SETTINGS = {"translate": ["translate", "--train-rows", "6000", "--epochs", "1"],
            # every verse but the dev slice, 3 epochs: outputs of varying length (18-96 tokens)
            "translate-eval": ["translate", "--train-rows", "23000", "--epochs", "3"]}
TARGETS = {
    "classify": "samples/s ≥ 1.5× Trainer; accuracy within 0.5 point; peak RSS ≤ 1.2×.",
    "causal": "tokens/s ≥ 1.0× Trainer (run_clm grouping) and ≥ 2.5× the padded-line run.",
    "translate": "training samples/s ≥ 1.3× (evaluation: each tool with its own model; the "
                 "generation target is --task translate-eval's).",
    "translate-eval": "one shared checkpoint, greedy, same max new tokens, batch 32: evaluation "
                      "by generation ≥ 2× faster (eval_seconds ratio ≤ 0.5); same predictions.",
    "generate": "16 prompts × 128 new tokens: batched ≥ 6× the loop's new tokens/s; one "
                "prompt ≤ 1.05× a bare model.generate call's seconds.",
    "eval": "BLEU on 20,000 segments ≤ 1.1× sacrebleu's seconds; llmkit --help < 1 s."}
PROMPTS, NEW_TOKENS, SEGMENTS = 16, 128, 20_000


def settings(task: str, seed: int = 42, extra: list[str] | None = None) -> argparse.Namespace:
    """The benchmark script's settings for this task and round (`extra`: the script's own
    options given to run.py)."""
    module = bench_module(task)
    args = module.parser().parse_args([*SETTINGS.get(task, []), *(extra or []),
                                       "--seed", str(seed)])
    if getattr(args, "data", None):
        module.DATA = args.data
    if task == "classify":
        args.model = args.model or module.minilm()
    return args


def precision(task: str, extra: list[str]) -> str:
    return getattr(settings(task, extra=extra), "mixed_precision", "no")


def bench_module(task: str) -> Any:
    if task == "classify":
        import classify as module
    elif task.startswith("translate"):
        import seq2seq as module
    else:
        import causal_lm as module
    return module


def worker(task: str, tool: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """One run of one tool, in this process; the parent prepared the data and model."""
    if task == "eval":  # both tools are command lines run from here: no torch in this process
        return {**scoring(tool == "llmkit"), "peak_rss_mb": peak_rss_mb(children=True)}
    bench, args = bench_module(task), settings(task, seed, extra)
    if task == "classify":
        train = bench.OUT / f"sst2-train-{args.rows}.tsv"
        result = (bench.run_llmkit if tool == "llmkit" else bench.run_trainer)(train, args)
    elif task == "causal":
        paths = (bench.OUT / "train.txt", bench.OUT / "valid.txt", bench.OUT / "model")
        run = {"llmkit": bench.run_llmkit, "Trainer": bench.run_trainer}.get(tool,
                                                                               bench.run_padded)
        result = run(*paths, args)
    elif task == "translate":
        folder = bench.OUT / "seq2seq-translate"
        paths = (folder / "model", folder / "train.jsonl", folder / "dev.jsonl")
        result = (bench.run_llmkit("translate", *paths, args) if tool == "llmkit"
                  else bench.run_trainer(*paths, args))
    elif task == "translate-eval":
        folder = bench.OUT / "seq2seq-translate-eval"
        result = (bench.eval_llmkit if tool == "llmkit" else bench.eval_trainer)(
            folder / "run", folder / "dev.jsonl", args)  # the checkpoint prepare() trained
        predictions = result.pop("predictions")
        (bench.OUT / f"translate-eval-{tool.split('.')[0]}.txt").write_text(
            "\n".join(predictions) + "\n", encoding="utf-8")
    else:
        result = generation(tool == "llmkit", bench.OUT / "model", bench.OUT / "valid.txt")
    return {**result, "peak_rss_mb": peak_rss_mb(children=False)}


def peak_rss_mb(children: bool) -> float:
    """Peak resident memory in MB of this process, or of the largest child it ran. Not this
    process's ru_maxrss: Linux carries the parent's high-water mark across fork and exec, so a
    worker started by a parent holding 1.6 GB would report at least 1.6 GB. VmHWM counts this
    process's own address space only. A child's ru_maxrss does carry this process's mark at the
    fork, which is why the eval worker imports no torch (a few tens of MB)."""
    if children:
        return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    kb = [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")]
    return round((kb[0] if kb else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)


def generation(llmkit: bool, folder: Path, valid: Path) -> dict[str, float]:
    """New tokens/s for 16 prompts (llmkit batched vs a loop of single calls: the first pass, then
    the median of 3 more), and the median seconds of one prompt (llmkit's path vs a bare
    `model.generate`); greedy, EOS off so every prompt makes exactly NEW_TOKENS tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.inference.generate import GenerationSettings, generate
    from llmkit.models import load_generator

    prompts = [line for line in valid.read_text().splitlines() if line.strip()][:PROMPTS]
    if llmkit:
        model, tokenizer = load_generator(str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model.generation_config.eos_token_id = None
    options = GenerationSettings(max_new_tokens=NEW_TOKENS)

    def one(prompt: str) -> int:
        if llmkit:
            return int(generate(model, tokenizer, [prompt], options, batch_size=1)[0]
                       ["new_tokens"])
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        return int(out.shape[1] - ids["input_ids"].shape[1])

    def batch() -> float:
        """New tokens/s over the 16 prompts: one batched call, or a loop of single calls."""
        start = time.perf_counter()
        if llmkit:
            made = sum(r["new_tokens"] for r in generate(model, tokenizer, prompts, options,
                                                          batch_size=PROMPTS))
        else:
            made = sum(one(prompt) for prompt in prompts)
        return made / (time.perf_counter() - start)

    first = batch()  # the first pass pays for growing the process's memory (the KV caches)
    steady = statistics.median(batch() for _ in range(3))
    single = []
    for prompt in prompts[:5]:
        start = time.perf_counter()
        one(prompt)
        single.append(time.perf_counter() - start)
    return {f"new_tokens_per_second_{PROMPTS}_prompts": round(steady, 1),
            f"first_pass_new_tokens_per_second_{PROMPTS}_prompts": round(first, 1),
            "single_prompt_seconds": round(statistics.median(single), 4)}


def scoring(llmkit: bool) -> dict[str, float]:
    """Wall seconds of BLEU on SEGMENTS segments through each tool's command line (and of
    `llmkit --help`); the scores must agree."""
    hyp, ref = BENCH / "out" / "eval" / "hyp.txt", BENCH / "out" / "eval" / "ref.txt"
    if llmkit:
        command = [cli("llmkit"), "eval", "-m", "bleu", "-p", str(hyp), "-r", str(ref), "--json"]
    else:
        command = [cli("sacrebleu"), str(ref), "-i", str(hyp), "-m", "bleu", "-b"]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    seconds = time.perf_counter() - start
    bleu = json.loads(out)["scores"][0]["value"] if llmkit else float(out)
    result = {f"bleu_{SEGMENTS}_segments_seconds": round(seconds, 3), "bleu": round(bleu, 1)}
    if llmkit:
        start = time.perf_counter()
        subprocess.run([cli("llmkit"), "--help"], capture_output=True, check=True)
        result["help_seconds"] = round(time.perf_counter() - start, 3)
    return result


def cli(name: str) -> str:
    """The console script installed beside this Python (what a user types)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise SystemExit(f"{name} is not installed beside {sys.executable}")
    return str(path)


def prepare(task: str, extra: list[str]) -> dict[str, Any]:
    """Data and model files the workers read, and the FLOPs per sample of the model."""
    bench, args = bench_module(task), settings(task, extra=extra)
    from transformers import AutoConfig, AutoTokenizer

    if task == "classify":
        bench.OUT.mkdir(parents=True, exist_ok=True)
        train = bench.subset(args.rows)
        texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
        lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(args.model)(
            texts, truncation=True, max_length=args.max_length)["input_ids"]]
        return flops(AutoConfig.from_pretrained(args.model), lengths)
    if task in ("causal", "generate"):
        bench.OUT.mkdir(parents=True, exist_ok=True)
        _, _, model = bench.prepare(args)
        return flops(AutoConfig.from_pretrained(model), [args.block])
    if task.startswith("translate"):
        folder = bench.OUT / f"seq2seq-{task}"
        if task == "translate-eval" and (folder / "run" / "metrics.json").exists():
            print(f"reusing the checkpoint in {folder / 'run'} (delete it to train anew)")
            return {"checkpoint": json.loads((folder / "run" / "metrics.json").read_text())}
        train, dev = bench.split_rows(bench.DATA / "bible-en-es" / "old-testament.jsonl",
                                      args.dev_rows, args.train_rows, folder)
        rows = [json.loads(line)["translation"] for line in train.read_text().splitlines()]
        bench.save_model([r["en"] for r in rows] + [r["es"] for r in rows], "marian", args,
                         folder / "model")
        if task == "translate-eval":  # one checkpoint both tools generate with (~20 minutes)
            bench.run_llmkit("translate", folder / "model", train, dev, args, folder / "run")
            return {"checkpoint": json.loads((folder / "run" / "metrics.json").read_text())}
        return {}
    # eval: Spanish verses as references; hypotheses drop one word in five (a BLEU near 60)
    verses = (BENCH.parents[1] / "shared" / "data" / "bible-en-es" / "old-testament.jsonl"
              ).read_text(encoding="utf-8").splitlines()[:SEGMENTS]
    refs = [json.loads(line)["translation"]["es"] for line in verses]
    rng = random.Random(0)
    hyps = [" ".join(w for w in r.split() if rng.random() > 0.2) for r in refs]
    folder = BENCH / "out" / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (folder / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    return {"segments": len(refs)}


def flops(config: Any, lengths: list[int]) -> dict[str, Any]:
    """Model FLOPs per training sample (forward and backward) from real token counts."""
    width = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    ffn = getattr(config, "intermediate_size", None) or 4 * width
    params = layers * (4 * width * width + 2 * width * ffn)  # attention + MLP matrices
    per_sample = statistics.fmean(6 * params * n + 12 * layers * width * n * n for n in lengths)
    return {"flops_per_sample": per_sample, "non_embedding_params": params,
            "mean_tokens": statistics.fmean(lengths)}


def matmul_peak(mixed_precision: str = "no", repeats: int = 5) -> float:
    """The best matmul FLOP/s of this machine in the run's precision (fp32 on the CPU; on a GPU,
    bf16 or fp32 at torch's defaults), measured now."""
    import torch

    cuda = torch.cuda.is_available()
    size = 8192 if cuda else 2048
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device="cuda" if cuda else "cpu")
            for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call on a GPU pays for kernel selection
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_rounds(task: str, rounds: int, extra: list[str]) -> dict[str, Any]:
    info = prepare(task, extra)
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS[task]}
    for index in range(rounds):
        for number, tool in enumerate(TOOLS[task]):
            done = subprocess.run([sys.executable, __file__, "--worker", task, str(number),
                                   str(42 + index), *extra], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise SystemExit(f"{task} {tool} failed:\n{done.stderr[-3000:]}")
            runs[tool].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {index + 1} {tool}: {runs[tool][-1]}", flush=True)
    if task == "translate-eval":  # the last round's predictions, verse by verse
        out = bench_module(task).OUT
        texts = [(out / f"translate-eval-{t.split('.')[0]}.txt").read_text(encoding="utf-8")
                 .splitlines() for t in TOOLS[task]]
        same = sum(a == b for a, b in zip(*texts, strict=True))
        info["same_predictions"] = f"{same} of {len(texts[0])}"
    return {"info": info, "runs": runs}


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def report(task: str, result: dict[str, Any], peak: float) -> str:
    """Medians per tool, and llmkit's figure divided by each reference's."""
    tools = TOOLS[task]
    values = [medians(result["runs"][tool]) for tool in tools]
    rounds = len(result["runs"][tools[0]])
    head = [f"metric (median of {rounds})", *tools, *(f"llmkit ÷ {t}" for t in tools[1:])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in dict.fromkeys(k for v in values for k in v):
        cells = [f"{v[key]:.4g}" if key in v else "" for v in values]
        ratios = [f"{values[0][key] / v[key]:.2f}×" if key in values[0] and v.get(key) else ""
                  for v in values[1:]]
        rows.append(f"| {key} | " + " | ".join(cells + ratios) + " |")
    per_sample = result["info"].get("flops_per_sample")
    speed = next((k for k in ("train_samples_per_second", "train_tokens_per_second")
                  if k in values[0]), None)
    if per_sample and speed:
        per_unit = per_sample if speed == "train_samples_per_second" else (
            per_sample / result["info"]["mean_tokens"])
        # the padded-line baseline's attention is over short lines: no comparable MFU
        cells = [f"{per_unit * v[speed] / peak:.3g}" if "mean_tokens_per_example" not in v
                 else "" for v in values]
        rows.append("| MFU | " + " | ".join(cells + [""] * (len(tools) - 1)) + " |")
    same, trained = result["info"].get("same_predictions"), result["info"].get("checkpoint")
    note = f"\n\nIdentical predictions: {same} verses." if same else ""
    if trained:
        final, run = trained["final"], trained["run"]
        note += (f" The checkpoint: llmkit translate, {run['train_samples']:,} samples "
                 f"({final['epoch']:g} epochs), eval loss {final['eval_loss']:.3f}, BLEU "
                 f"{final['bleu']:.2f}, chrF {final['chrf']:.1f}. decode_row_steps: the rows "
                 "× decoder steps each tool's batches ran (a batch steps until its longest "
                 "output ends); useful_share: generated tokens ÷ those row-steps.")
    return "\n".join(rows) + f"{note}\n\nTargets: {TARGETS[task]}"


def machine(peak: float, mixed_precision: str) -> str:
    import accelerate
    import torch
    import transformers

    dtype = "bf16" if mixed_precision == "bf16" else "fp32"
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {dtype} "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s (measured in this run); Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, accelerate {accelerate.__version__}")


def write(task: str, text: str, label: str = "") -> None:
    key = f"{task}:{label}" if label else task
    start, end = f"<!-- run.py:{key} -->", f"<!-- /run.py:{key} -->"
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    title = f"`run.py --task {task}`" + (f" ({label})" if label else "")
    block = f"{start}\n### {title}\n\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(current, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TOOLS), default="classify")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "TOOL", "SEED"),
                        help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.worker:
        task, number, seed = args.worker
        print(json.dumps(worker(task, TOOLS[task][int(number)], int(seed), extra)))
        return
    import torch

    mixed = precision(args.task, extra)
    # CPU fp32 is the setting; anything else is reported beside it, not over it
    label = "-".join(part for part in ("cuda" if torch.cuda.is_available() else "",
                                       mixed if mixed != "no" else "") if part)
    peak = matmul_peak(mixed)
    result = run_rounds(args.task, args.rounds, extra)
    text = (f"{report(args.task, result, peak)}\n\nMachine: {machine(peak, mixed)}. "
            f"{time.strftime('%Y-%m-%d')}.\n")
    print(text)
    write(args.task, text, label)
    name = f"run-{args.task}" + (f"-{label}" if label else "")
    (BENCH / "out" / f"{name}.json").write_text(json.dumps({**result, "matmul_peak": peak},
                                                           indent=1))


if __name__ == "__main__":
    main()
