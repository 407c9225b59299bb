"""What a finished run shows and shares, written from its files after training (so any finished
run can be drawn again): the training curves (`curves.png`), the model card (`README.md`, read by
the Hub and huggingface_hub's ModelCard) and the manifest (`manifest.json`: versions, command,
data checksums, machine, times)."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from llmkit import hub
from llmkit.errors import LlmkitError
from llmkit.run.report import parsed  # None for a log line torn by an interruption

log = logging.getLogger("llmkit")
PIPELINES = {"classify": "text-classification", "qa": "question-answering",
             "translate": "translation", "summarize": "summarization", "reward":
             "text-classification", "generate": "text-generation", "dpo": "text-generation"}
# numbers of an evaluation that are not quality metrics
NOT_METRICS = {"step", "epoch", "train_loss", "eval_samples", "eval_tokens", "eval_seconds",
               "save_seconds", "generated_tokens"}
PACKAGES = ("llmkit", "torch", "transformers", "accelerate", "datasets", "peft", "tokenizers")


def finished(run: Path) -> dict[str, Any]:
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise LlmkitError(f"{run} is not a finished run (no metrics.json): give the output "
                          "folder of a completed llmkit finetune")
    try:
        found = json.loads(metrics.read_text(encoding="utf-8"))
        problem = "" if isinstance(found, dict) and isinstance(found.get("history"), list) and \
            "step" in (found.get("final") or {}) else "no final step and history"
    except json.JSONDecodeError as err:
        problem = f"{err.msg} at line {err.lineno}"
    if problem:
        raise LlmkitError(f"{metrics} is damaged ({problem}): the run did not finish writing "
                          "it; run it again with --resume")
    return found


def training_log(run: Path) -> list[dict[str, Any]]:
    path = run / "train_log.jsonl"
    if not path.is_file():
        return []
    records = map(parsed, path.read_text(encoding="utf-8").splitlines())
    return [r for r in records if r and "learning_rate" in r]


def metric_names(histories: list[list[dict[str, Any]]]) -> list[str]:
    names: dict[str, None] = {}
    for history in histories:
        for record in history:
            names.update({k: None for k, v in record.items() if k not in NOT_METRICS
                          and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return list(names)


def draw(runs: list[Path], output: Path) -> Path:
    """Training loss and learning rate against the step, then every evaluation metric; the
    kept checkpoint marked (a dotted line, and a star on the metric it was chosen by). Several
    runs share the panels, one colour each. A missing folder of `output` is refused, as for
    every --output file (and by matplotlib's savefig): a typo would otherwise leave folders."""
    from llmkit.data.read import check_output_file

    check_output_file(output)
    found = [(run, finished(run), training_log(run)) for run in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()  # what savefig can write without a GUI
    if output.suffix.lstrip(".").lower() not in formats:
        raise LlmkitError(f"--output {output}: name a picture file ({', '.join(sorted(formats))})")
    metrics = metric_names([m["history"] for _, m, _ in found])
    panels = ["loss", "learning rate", *[m for m in metrics if m != "eval_loss"]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for i, (run, metrics_json, logged) in enumerate(found):
        for panel, ax in zip(panels, axes.flat, strict=False):
            draw_panel(ax, panel, f"C{i}", run.name if len(runs) > 1 else "", logged,
                       metrics_json)
    for panel, ax in zip(panels, axes.flat, strict=False):
        ax.set(title=panel.replace("_", " "), xlabel="step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(f"{' vs '.join(r.name for r in runs)}  (dotted: the kept checkpoint)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def draw_panel(ax: Any, panel: str, colour: str, name: str, logged: list[dict[str, Any]],
               metrics_json: dict[str, Any]) -> None:
    """One run's curve on one panel, its kept checkpoint marked."""
    history = metrics_json["history"]
    best = metrics_json["final"]["step"]
    chosen = metrics_json.get("metric_for_best", "eval_loss")
    if panel == "loss":
        ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], color=colour,
                alpha=0.8, label=f"{name} training".strip())
        series = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
        label = f"{name} validation".strip()
    elif panel == "learning rate":
        ax.plot([r["step"] for r in logged], [r["learning_rate"] for r in logged],
                color=colour, label=name or None)
        series, label = [], ""
    else:  # a task's figures logged in training too (preference rewards): a line
        trained = [(r["step"], r[panel]) for r in logged if panel in r]
        if trained:
            ax.plot(*zip(*trained, strict=True), color=colour, alpha=0.8,
                    label=f"{name} training".strip())
        series = [(r["step"], r[panel]) for r in history if panel in r]
        label = f"{name} validation".strip() if trained else name
    if series:
        ax.plot(*zip(*series, strict=True), "o--", color=colour, markersize=4,
                label=label or None)
    ax.axvline(best, color=colour, linestyle=":", linewidth=1)
    marked = {"loss": "eval_loss"}.get(panel, panel)
    if marked == chosen:
        value = next((r[chosen] for r in history if r["step"] == best), None)
        if value is not None:
            ax.plot([best], [value], "*", color=colour, markersize=12)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def checksums(spec: str | None) -> dict[str, str]:
    """sha256 of each local file a data option names (a glob: every match); a Hub dataset
    is named by its id."""
    import glob
    import hashlib

    if not spec:
        return {}
    paths = sorted(glob.glob(str(Path(spec).expanduser()))) or [spec]
    found = {}
    for path in paths:
        if not Path(path).is_file():
            return {spec: "Hub dataset (not hashed)"}
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[path] = digest.hexdigest()
    return found


def git_commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def manifest(cfg: Any, run: dict[str, Any], started: float, ended: float) -> dict[str, Any]:
    import datetime

    def moment(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()

    return {"versions": versions(), "command": shlex.join(["llmkit", *sys.argv[1:]])
            if Path(sys.argv[0]).name in ("llmkit", "__main__.py") else shlex.join(sys.argv),
            "reproduce": f"llmkit finetune {cfg.task} --recipe {Path(cfg.output) / 'config.yaml'}",
            "data": {**checksums(cfg.data.train), **checksums(cfg.data.validation)},
            "seed": cfg.train.seed, "processes": run.get("num_processes"),
            "device": run.get("device"), "mixed_precision": run.get("mixed_precision"),
            "git_commit": git_commit(), "started": moment(started), "ended": moment(ended)}


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not hub.looks_like_path(str(name)) and not hub.is_local(str(name))


def model_card(out: Path, cfg: Any, metrics: dict[str, Any], made: dict[str, Any]) -> Path:
    """README.md: YAML metadata the Hub reads (pipeline, base model, tags, datasets, the final
    metrics as a model-index), then the task, data, settings, every evaluation, versions and
    the command that reproduces the run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pipeline, final = PIPELINES[cfg.task], metrics["final"]
    hub_data = list(dict.fromkeys(d for d in (cfg.data.train, cfg.data.validation)
                                  if is_hub_id(d)))
    scored = metric_names([[final]])
    data = ModelCardData(
        library_name="peft" if cfg.adapter.lora else "transformers", pipeline_tag=pipeline,
        base_model=cfg.model if is_hub_id(cfg.model) and not cfg.from_scratch else None,
        tags=["llmkit", cfg.task, *(["lora"] if cfg.adapter.lora else [])],
        datasets=hub_data or None, model_name=Path(cfg.output).name,
        eval_results=[EvalResult(task_type=pipeline, dataset_type=hub_data[-1] if hub_data
                                 else "local", dataset_name=Path(str(
                                     cfg.data.validation or cfg.data.train)).name,
                                 metric_type=k, metric_value=round(float(final[k]), 4))
                      for k in scored] or None)
    settings = card_settings(cfg, metrics["run"])
    columns = ["step", "epoch", "train_loss", *metric_names([metrics["history"]])]
    lines = [f"# {Path(cfg.output).name}", "",
             (f"A new model of `{cfg.model}`'s architecture (random weights, config "
              f"changes: {cfg.config_overrides or 'none'})" if cfg.from_scratch else
              f"`{cfg.model}` fine-tuned") + f" with llmkit for {pipeline} (`llmkit finetune "
             f"{cfg.task}`).", "", "## Data", "",
             f"- training: `{cfg.data.train}`",
             f"- validation: `{cfg.data.validation or 'a held-out slice of the training rows'}`",
             "", "## Training", "", "| setting | value |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in settings.items()], "", "## Evaluation", "",
             f"Kept: the checkpoint of step {final['step']}, best at "
             f"`{metrics['metric_for_best']}`.", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns),
             *["| " + " | ".join(cell(r.get(c)) for c in columns) + " |"
               for r in metrics["history"]], "", "## Use", "", "```python",
             "from transformers import pipeline", "",
             f"model = pipeline({pipeline!r}, model=\"{Path(cfg.output).name}\")", "```", "",
             "## Framework versions", "",
             *[f"- {k} {v}" for k, v in made["versions"].items()], "", "## Reproduce", "",
             "```bash", made["command"], f"# or, from the resolved settings: {made['reproduce']}",
             "```", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    ModelCard(text).save(out / "README.md")
    return out / "README.md"


def card_settings(cfg: Any, run: dict[str, Any]) -> dict[str, Any]:
    """The model card's table of training settings."""
    tc = cfg.train
    settings = {"learning rate": tc.learning_rate, "epochs": tc.epochs, "max steps":
                tc.max_steps or "-", "batch size (global)": run.get("global_batch_size"),
                "scheduler": tc.lr_scheduler, "warm-up": tc.warmup_steps or tc.warmup_ratio,
                "weight decay": tc.weight_decay, "precision": tc.mixed_precision, "seed": tc.seed,
                "trainable parameters": f"{run.get('trainable_parameters', 0):,}"}
    if cfg.adapter.lora:
        settings["LoRA"] = f"r {cfg.adapter.lora_r}, alpha {cfg.adapter.lora_alpha}, " \
                           f"dropout {cfg.adapter.lora_dropout}"
    return settings


def cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def write(out: Path, cfg: Any, started: float, ended: float) -> None:
    """The picture, the manifest and the model card of a finished run."""
    metrics = finished(out)
    made = manifest(cfg, metrics["run"], started, ended)
    (out / "manifest.json").write_text(json.dumps(made, indent=1), encoding="utf-8")
    model_card(out, cfg, metrics, made)
    draw([out], out / "curves.png")


def push(run: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished run to the Hub as one commit (the model, tokenizer, model card,
    curves and manifest; not checkpoints or tracker logs): all of it, or nothing."""
    folder = Path(run)
    if not folder.is_dir():
        raise LlmkitError(f"{run}: no such run directory")
    finished(folder)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hub.hub_offline():
        raise LlmkitError(f"cannot reach the Hugging Face Hub ({endpoint}): nothing was "
                          "uploaded; push again once it can be reached")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   ignore_patterns=["checkpoints/*", "tensorboard/*", "merged/*"],
                                   commit_message=f"llmkit run {folder.name}")
    except Exception as err:  # network, token, permission: the commit was not made
        first = (str(err).splitlines() or [""])[0][:200]
        raise LlmkitError(f"push to {repo_id} failed ({type(err).__name__}: {first}); the "
                          f"run was not uploaded (log in with `hf auth login` or set HF_TOKEN "
                          f"if the Hub asks for a token)") from err
    return str(getattr(commit, "commit_url", None) or f"{endpoint}/{repo_id}")
