"""What a finished run shows and shares, from its files (so any finished run is drawn again):
the curves (`curves.png`), the model card (`README.md`), the manifest's file, the upload."""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

from llmkit import hub
from llmkit.errors import LlmkitError
from llmkit.run.report import finished, format_value, manifest, moment, training_log

PIPELINES = {"classify": "text-classification", "qa": "question-answering",
             "translate": "translation", "summarize": "summarization", "reward":
             "text-classification", "generate": "text-generation", "dpo": "text-generation"}
# numbers of an evaluation that are not quality metrics
NOT_METRICS = {"step", "epoch", "train_loss", "eval_samples", "eval_tokens", "eval_seconds",
               "save_seconds", "generated_tokens"}
LEFT_OUT = ["checkpoints/*", "tensorboard/*", "merged/*"]  # what push does not upload
CALLS = {  # the end of a card's "Use" code, by pipeline
    "text-classification": ["run = pipeline('text-classification', model=model, tokenizer="
                            "tokenizer)", "print(run('A sentence to classify.'))"],
    "text-generation": ["run = pipeline('text-generation', model=model, tokenizer=tokenizer)",
                        "print(run('Once upon a', max_new_tokens=20))"],
    "question-answering": ["inputs = tokenizer('Who?', 'Ann wrote it.', return_tensors='pt')",
                           "found, ids = model(**inputs), inputs['input_ids'][0]", "print("
                           "tokenizer.decode(ids[found.start_logits.argmax():found.end_logits."
                           "argmax() + 1]))"],
    "seq2seq": ["ids = model.generate(**tokenizer(['A text.'], return_tensors='pt'), max_new_"
                "tokens=64)", "print(tokenizer.batch_decode(ids, skip_special_tokens=True))"]}


def metric_names(histories: list[list[dict[str, Any]]]) -> list[str]:
    return list(dict.fromkeys(k for history in histories for record in history
                              for k, v in record.items() if k not in NOT_METRICS and
                              isinstance(v, (int, float)) and not isinstance(v, bool)))


def draw(runs: list[Path], output: Path) -> Path:
    """Training loss, learning rate (if logged twice) and every evaluation metric against the
    step, on a log scale where the values span over 10x; the kept checkpoint marked (dotted; a
    star on its metric); a colour per run. `output` in a missing folder is refused."""
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
    panels = ["loss", *["learning rate"] * any(len(logged) > 1 for *_, logged in found),
              *[m for m in metric_names([m["history"] for _, m, _ in found]) if m != "eval_loss"]]
    cols, rows = min(3, len(panels)), math.ceil(len(panels) / 3)
    figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for panel, ax in zip(panels, axes.flat, strict=False):
        values = [v for i, (run, metrics, logged) in enumerate(found) for v in draw_panel(
            ax, panel, f"C{i}", run.name if len(runs) > 1 else "", logged, metrics)]
        wide = panel != "learning rate" and 0 < min(values, default=0) < max(values) / 10
        ax.set(title=panel.replace("_", " "), xlabel="step", yscale="log" if wide else "linear",
               ylabel={"loss": "cross-entropy"}.get(panel, panel.replace("_", " "))
               + (" (log scale)" if wide else ""))
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
               metrics: dict[str, Any]) -> list[float]:
    """One run's curves on one panel (a lone point as a marker: it shows, and so does its
    legend entry), its kept checkpoint marked; returns the values drawn."""
    history, best = metrics["history"], metrics["final"]["step"]
    key, logged_key = {"loss": "eval_loss"}.get(panel, panel), panel.replace(" ", "_")
    trained = [(r["step"], r[logged_key]) for r in logged if logged_key in r]
    series = [(r["step"], r[key]) for r in history if key in r and panel != "learning rate"]
    for points, style, lone, label in ((trained, "-", "s", "training" if series else ""),
                                       (series, "o--", "o", "validation" if trained else "")):
        if points:
            ax.plot(*zip(*points, strict=True), style if len(points) > 1 else lone,
                    color=colour, markersize=4, label=f"{name} {label}".strip() or None)
    ax.axvline(best, color=colour, linestyle=":", linewidth=1)
    value = next((r.get(key) for r in history if r["step"] == best), None)
    if key == metrics.get("metric_for_best", "eval_loss") and value is not None:
        ax.plot([best], [value], "*", color=colour, markersize=12)
    return [float(v) for _, v in trained + series]


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not hub.looks_like_path(str(name)) and not hub.is_local(str(name))


def base_card(model: str) -> dict[str, Any]:
    """License and language from the base model's own card, where one is at hand offline (a
    local folder's README.md, or the Hub cache's): a fine-tune inherits them."""
    import yaml
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: Any = Path(model).expanduser() / "README.md"
    try:  # try_to_load_from_cache: a path, or None when the Hub cache does not hold it
        readme = readme if readme.is_file() or not is_hub_id(model) else try_to_load_from_cache(
            model, "README.md")
        data = ModelCard.load(readme, ignore_metadata_errors=True).data if isinstance(
            readme, (str, Path)) and Path(readme).is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # a bad id (HFValidationError) or card
        data = None
    return {k: getattr(data, k) for k in ("license", "license_name", "license_link", "language")
            if getattr(data, k, None)}


def model_card(out: Path, cfg: Any, metrics: dict[str, Any], made: dict[str, Any],
               path: str | None = None, merged: bool = False) -> Path:
    """README.md: YAML metadata the Hub reads (pipeline, the base model by the name it was
    given, license and language from the base's card, tags, datasets, the final metrics as a
    model-index), then intended use, data, settings, every evaluation, code that loads it from
    `path` (default: the run folder as given), versions and the commands that made it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pipeline, final, adapter = PIPELINES[cfg.task], metrics["final"], cfg.adapter.lora
    hub_data = [d for d in dict.fromkeys((cfg.data.train, cfg.data.validation)) if is_hub_id(d)]
    inherited = {} if cfg.from_scratch else base_card(cfg.model)
    data = ModelCardData(
        library_name="peft" if adapter and not merged else "transformers", pipeline_tag=pipeline,
        base_model=None if cfg.from_scratch else cfg.model if is_hub_id(cfg.model)
        else Path(cfg.model).expanduser().resolve().name, **{"license": "unknown", **inherited},
        tags=["llmkit", cfg.task, *["lora"] * adapter, *["merged"] * merged],
        datasets=hub_data or None, model_name=Path(path or cfg.output).name,
        eval_results=[EvalResult(task_type=pipeline, dataset_type=hub_data[-1] if hub_data
                                 else "local", dataset_name=Path(str(
                                     cfg.data.validation or cfg.data.train)).name,
                                 metric_type=k, metric_value=round(float(final[k]), 4))
                      for k in metric_names([[final]])] or None)
    columns = ["step", "epoch", "train_loss", *metric_names([metrics["history"]])]
    lines = [f"# {data.model_name}", "", (
        f"A new model of `{cfg.model}`'s architecture (random weights, config changes: "
        f"{cfg.config_overrides or 'none'})" if cfg.from_scratch else f"`{data.base_model}` "
        "fine-tuned") + f" with llmkit for {pipeline} (`llmkit finetune {cfg.task}`)"
        + (", its LoRA adapter merged in." if merged else "."), "", "## Intended use", "",
        f"{pipeline.replace('-', ' ').capitalize()} of texts like its training rows. It was "
        "evaluated only on the validation rows below: check it on your own data before relying "
        "on it. License: "
        f"{data.license}{' (the base model card’s)' if 'license' in inherited else ''}.", "",
        "## Data", "", f"- training: `{cfg.data.train}`", "- validation: "
        f"`{cfg.data.validation or 'a held-out slice of the training rows'}`", "", "## Training",
        "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in card_settings(cfg, metrics["run"]).items()], "",
        "## Evaluation", "", f"Kept: the checkpoint of step {final['step']}, best at "
        f"`{metrics['metric_for_best']}`.", "", "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns), *["| " + " | ".join(format_value(r[c]) if c in r else ""
                                                   for c in columns) + " |"
                                       for r in metrics["history"]], "", "## Use", "",
        "```python", *use(cfg.task, path or cfg.output, adapter and not merged), "```", "",
        "## Framework versions", "", *[f"- {k} {v}" for k, v in made["versions"].items()], "",
        "## Reproduce", "", "```bash", made["command"], "# or, from the resolved settings: "
        f"{made['reproduce']}", *made.get("merged", {}).get("commands", []), "```"]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(out / "README.md")
    return out / "README.md"


def use(task_name: str, path: str, adapter: bool) -> list[str]:
    """The card's "Use" code: plain transformers on `path`, with peft for an adapter run (given
    the run's labels: peft builds the base with the base's own)."""
    from llmkit.tasks import get_task

    auto, pipe = get_task(task_name).auto_model, PIPELINES[task_name]
    loader = auto.replace("AutoModel", "AutoPeftModel") if adapter else auto
    labels = adapter and "SequenceClassification" in auto
    return [*[f"from peft import {loader}"] * adapter, "from transformers import " + ", ".join(
                [*["AutoConfig"] * labels, *[loader] * (not adapter), "AutoTokenizer",
                 *["pipeline"] * pipe.startswith("text-")]), "",
            f"path = {path!r}  # this folder (or its Hub id, once pushed)",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            *["config = AutoConfig.from_pretrained(path)  # the run's labels"] * labels,
            f"model = {loader}.from_pretrained(" + ("\n    path, num_labels=config.num_labels, "
                                                    "id2label=config.id2label, label2id=config."
                                                    "label2id\n" if labels else "path") + ")"
            + ".merge_and_unload()" * adapter,
            *CALLS.get(pipe, CALLS["seq2seq"])]


def card_settings(cfg: Any, run: dict[str, Any]) -> dict[str, Any]:
    """The model card's table of training settings."""
    tc, lora = cfg.train, cfg.adapter
    return {"learning rate": tc.learning_rate, "epochs": tc.epochs, "max steps":
            tc.max_steps or "-", "batch size (global)": run.get("global_batch_size"),
            "scheduler": tc.lr_scheduler, "warm-up": tc.warmup_steps or tc.warmup_ratio,
            "weight decay": tc.weight_decay, "precision": tc.mixed_precision, "seed": tc.seed,
            "trainable parameters": f"{run.get('trainable_parameters', 0):,}",
            **({"LoRA": f"r {lora.lora_r}, alpha {lora.lora_alpha}, dropout "
                        f"{lora.lora_dropout}"} if lora.lora else {})}


def write(out: Path, cfg: Any, started: float, ended: float) -> None:
    """The picture, the manifest and the model card of a finished run."""
    metrics = finished(out)
    made = manifest(cfg, metrics["run"], started, ended)
    (out / "manifest.json").write_text(json.dumps(made, indent=1), encoding="utf-8")
    model_card(out, cfg, metrics, made)
    draw([out], out / "curves.png")


def merged(run: str | Path, output: str | Path, base_model: str | None = None) -> Path:
    """`llmkit merge` (and finetune --merge): the merged model, with the run's card (for a full
    model at `output`, as given) and manifest, the merge among its commands."""
    from llmkit.inference.predict import merge, run_config

    folder, cfg, saved = merge(run, output, base_model), run_config(str(run)), \
        Path(run) / "manifest.json"
    if cfg is None or not (Path(run) / "metrics.json").is_file():
        return folder  # not a finished run: nothing to describe
    metrics = finished(Path(run))
    made = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else \
        manifest(cfg, metrics["run"], time.time(), time.time())
    made["merged"] = {"from": str(run), "at": moment(time.time()), "commands": [
        f"llmkit merge {shlex.quote(str(run))} --output {shlex.quote(str(output))}"]}
    (folder / "manifest.json").write_text(json.dumps(made, indent=1), encoding="utf-8")
    model_card(folder, cfg, metrics, made, str(output), merged=True)
    return folder


def repo_folder(run: str | Path, repo_id: str) -> Path:
    """The finished run to push; a --repo-id that is a local path (the run folder's place) or
    not a Hub id is refused offline, before any network call."""
    from huggingface_hub.utils import validate_repo_id

    if hub.is_local(repo_id) or repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise LlmkitError(f"--repo-id {repo_id} is a local path: give the Hub repository as "
                          "USER/NAME (the run folder is the first argument)")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # huggingface_hub's HFValidationError
        raise LlmkitError(f"--repo-id {repo_id} is not a Hub repository id (USER/NAME): "
                          f"{str(err).splitlines()[0]}") from err
    if not Path(run).is_dir():
        raise LlmkitError(f"{run}: no such run directory")
    finished(Path(run))
    return Path(run)


def plan(run: str | Path, repo_id: str) -> dict[str, Any]:
    """push --dry-run: the commit's files (bytes each), the card's metadata read offline, notes."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    from llmkit.inference.predict import run_config

    folder = repo_folder(run, repo_id)
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    files = {n: (folder / n).stat().st_size for n in filter_repo_objects(
        names, ignore_patterns=[*LEFT_OUT, *DEFAULT_IGNORE_PATTERNS])}
    try:
        data = ModelCard.load(folder / "README.md").data.to_dict()
    except (OSError, ValueError) as err:  # no card, or YAML / model-index that does not parse
        raise LlmkitError(f"{folder / 'README.md'}: no valid model card ({err})") from err
    given, base = getattr(run_config(str(folder)), "model", ""), data.get("base_model")
    notes = [f"base_model {base!r} is the name of the local folder {given}: the Hub links it to "
             "a Hub model of that id, if any"] if base and given and not is_hub_id(given) else []
    if data.get("license", "unknown") == "unknown":
        notes.append("license: unknown; set `license:` in README.md before sharing")
    return {"repo_id": repo_id, "files": files, "metadata": data, "notes": notes}


def push(run: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished run to the Hub as one commit (the model, tokenizer, model card,
    curves and manifest; not checkpoints or tracker logs): all of it, or nothing."""
    folder = repo_folder(run, repo_id)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hub.hub_offline():
        raise LlmkitError(f"cannot reach the Hugging Face Hub ({endpoint}): nothing was "
                          "uploaded; push again once it can be reached (--dry-run shows what "
                          "would go)")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   ignore_patterns=list(LEFT_OUT),
                                   commit_message=f"llmkit run {folder.name}")
    except Exception as err:  # network, token, permission: the commit was not made
        first = (str(err).splitlines() or [""])[0][:200]
        raise LlmkitError(f"push to {repo_id} failed ({type(err).__name__}: {first}); the "
                          f"run was not uploaded (log in with `hf auth login` or set HF_TOKEN "
                          f"if the Hub asks for a token)") from err
    return str(getattr(commit, "commit_url", None) or f"{endpoint}/{repo_id}")
