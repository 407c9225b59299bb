"""The `llmkit` command: a thin Typer shell over the Python API, with one error boundary.

Heavy libraries (torch, transformers, datasets) are imported inside commands, so `--help` is fast.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.config import default_of, load_config, option_paths, shipped_recipes
from llmkit.errors import LlmkitError
from llmkit.tasks import get_task, task_names

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="Fine-tune and evaluate pretrained Hugging Face checkpoints.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and copy shipped recipes.")
app.add_typer(recipes_app, name="recipes")


def opt(path: str, help: str, *names: str, panel: str = "") -> Any:
    """An option that sets config path `path`; None means 'not given', so recipes show through."""
    default = default_of(path)
    shown = "" if default in ("", None) else f" [dim](default: {default})[/]"
    section = path.split(".")[0] if "." in path else "run"
    return typer.Option(*names, help=help + shown, show_default=False,
                        rich_help_panel=panel or {"run": "Run", "data": "Data",
                                                  "train": "Training"}[section])


FINETUNE_EXAMPLES = """[bold]Examples[/]

  llmkit finetune classify --model bert-base-uncased --train train.csv \\
      --validation dev.csv --output runs/sst2

  llmkit finetune classify --recipe classify-sst2 -s train.learning_rate=3e-5 --output runs/sst2

  llmkit finetune classify --model ./minilm --train data.tsv --text-column sentence \\
      --epochs 2 --output runs/x

  llmkit finetune generate --model gpt2 --train corpus.txt --block-size 512 --output runs/gpt

  llmkit finetune translate --model Helsinki-NLP/opus-mt-en-ro --train wmt16 \
      --dataset-config ro-en --source-lang en --target-lang ro --output runs/en-ro

  llmkit finetune summarize --model t5-small --train xsum --text-column document \
      --summary-column summary --eval-max-samples 500 --output runs/xsum

  accelerate launch --multi_gpu --num_processes 2 -m llmkit finetune classify --recipe my.yaml
"""


@app.command(epilog=FINETUNE_EXAMPLES)
def finetune(  # noqa: PLR0913 - every option is one config path
    task: Annotated[str, typer.Argument(help=f"One of: {', '.join(task_names())}.")],
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe YAML file, or the "
                      "name of a shipped one (llmkit recipes list).",
                      rich_help_panel="Run")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override any config "
                         "value: -s train.learning_rate=3e-5 (repeatable).",
                         rich_help_panel="Run")] = None,
    model: Annotated[str | None, opt("model", "Hub id or local checkpoint folder.", "--model",
                                     "-m")] = None,
    output: Annotated[str | None, opt("output", "Run directory to write.", "--output",
                                      "-o")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint "
                      "in --output.", rich_help_panel="Run")] = False,
    resume_from: Annotated[str | None, typer.Option(help="Continue from this checkpoint folder.",
                           rich_help_panel="Run")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in "
                         "--output.", rich_help_panel="Run")] = False,
    train: Annotated[str | None, opt("data.train", "Training rows: csv/tsv/json/jsonl/parquet "
                                     "file or Hub dataset id.", "--train")] = None,
    validation: Annotated[str | None, opt("data.validation", "Validation rows; without it a "
                          "seeded slice of --train is held out.", "--validation")] = None,
    dataset_config: Annotated[str | None, opt("data.dataset_config", "Hub dataset configuration "
                              "name (e.g. sst2 for glue).", "--dataset-config")] = None,
    train_split: Annotated[str | None, opt("data.train_split", "Hub split for --train.",
                                           "--train-split")] = None,
    validation_split: Annotated[str | None, opt("data.validation_split", "Hub split for "
                                "--validation.", "--validation-split")] = None,
    validation_fraction: Annotated[float | None, opt("data.validation_fraction", "Share of "
                                   "--train held out when there is no --validation.",
                                   "--validation-fraction")] = None,
    text_column: Annotated[str | None, opt("data.text_column", "Column with the text.",
                                           "--text-column")] = None,
    text_pair_column: Annotated[str | None, opt("data.text_pair_column", "Second text column, "
                                "for sentence pairs.", "--text-pair-column")] = None,
    label_column: Annotated[str | None, opt("data.label_column", "Column with the label (ints or "
                            "strings).", "--label-column")] = None,
    max_length: Annotated[int | None, opt("data.max_length", "Truncate inputs (seq2seq: "
                          "sources) to this many tokens; batches are padded only to their "
                          "longest row.", "--max-length", "--max-source-length")] = None,
    max_train_samples: Annotated[int | None, opt("data.max_train_samples", "Use only the first N "
                                 "training rows.", "--max-train-samples")] = None,
    max_eval_samples: Annotated[int | None, opt("data.max_eval_samples", "Use only the first N "
                                "validation rows (seq2seq: fewer to generate).",
                                "--max-eval-samples", "--eval-max-samples")] = None,
    block_size: Annotated[int | None, opt("data.block_size", "generate: tokens per packed block "
                          "(clamped to the model's context).", "--block-size")] = None,
    sample_by: Annotated[str | None, opt("data.sample_by", "How a .txt file splits into "
                         "documents: document (whole file), paragraph (blank lines) or line.",
                         "--sample-by")] = None,
    separate_documents: Annotated[bool | None, opt("data.separate_documents", "generate: keep "
                                  "attention and positions inside each document of a block.",
                                  "--separate-documents/--no-separate-documents")] = None,
    prompt_column: Annotated[str | None, opt("data.prompt_column", "generate: prompt column of "
                             "prompt/completion rows (no loss on prompts).", "--prompt-column")
                             ] = None,
    completion_column: Annotated[str | None, opt("data.completion_column", "generate: "
                                 "completion column.", "--completion-column")] = None,
    question_column: Annotated[str | None, opt("data.question_column", "qa: question column.",
                               "--question-column")] = None,
    context_column: Annotated[str | None, opt("data.context_column", "qa: context column.",
                              "--context-column")] = None,
    answers_column: Annotated[str | None, opt("data.answers_column", "qa: answers column "
                              "({text: [...], answer_start: [...]}).", "--answers-column")
                              ] = None,
    doc_stride: Annotated[int | None, opt("data.doc_stride", "qa: tokens shared by "
                          "neighbouring windows of a long context.", "--doc-stride")] = None,
    version_2: Annotated[bool | None, opt("data.version_2", "qa: unanswerable questions "
                         "(SQuAD 2.0); detected from the data when not given.",
                         "--version-2/--no-version-2")] = None,
    n_best: Annotated[int | None, opt("data.n_best", "qa: start/end candidates per window.",
                      "--n-best")] = None,
    max_answer_length: Annotated[int | None, opt("data.max_answer_length", "qa: longest answer "
                                 "in tokens.", "--max-answer-length")] = None,
    null_threshold: Annotated[float | None, opt("data.null_threshold", "qa (v2): answer empty "
                              "when the null score beats the best span by more than this.",
                              "--null-threshold")] = None,
    bad_answers: Annotated[str | None, opt("data.bad_answers", "qa: fail or skip examples whose "
                           "answer is not at answer_start.", "--bad-answers")] = None,
    source_lang: Annotated[str | None, opt("data.source_lang", "translate: source language "
                           "key of the data (en; mBART/NLLB codes such as en_XX work too).",
                           "--source-lang", panel="Seq2seq")] = None,
    target_lang: Annotated[str | None, opt("data.target_lang", "translate: target language.",
                           "--target-lang", panel="Seq2seq")] = None,
    translation_column: Annotated[str | None, opt("data.translation_column", "translate: "
                                  "column of {lang: text} pairs; '' reads one column per "
                                  "language.", "--translation-column", panel="Seq2seq")] = None,
    summary_column: Annotated[str | None, opt("data.summary_column", "summarize: summary "
                              "column (the document is --text-column).", "--summary-column",
                              panel="Seq2seq")] = None,
    source_prefix: Annotated[str | None, opt("data.source_prefix", "Text put before every "
                             "source; T5 checkpoints default to theirs ('summarize: ').",
                             "--source-prefix", panel="Seq2seq")] = None,
    max_target_length: Annotated[int | None, opt("data.max_target_length", "Truncate targets "
                                 "to this many tokens (counted in the log).",
                                 "--max-target-length", panel="Seq2seq")] = None,
    empty_rows: Annotated[str | None, opt("data.empty_rows", "fail or skip rows with an empty "
                          "source or target.", "--empty-rows", panel="Seq2seq")] = None,
    num_beams: Annotated[int | None, opt("data.num_beams", "Beams when evaluating by "
                         "generation (default: the checkpoint's, else 1).", "--num-beams",
                         panel="Seq2seq")] = None,
    max_new_tokens: Annotated[int | None, opt("data.max_new_tokens", "Tokens generated at most "
                              "per evaluation row (default: --max-target-length).",
                              "--max-new-tokens", panel="Seq2seq")] = None,
    epochs: Annotated[int | None, opt("train.epochs", "Passes over the training rows.",
                                      "--epochs")] = None,
    learning_rate: Annotated[float | None, opt("train.learning_rate", "Peak learning rate.",
                             "--learning-rate", "--lr")] = None,
    batch_size: Annotated[int | None, opt("train.batch_size", "Rows per batch on each process.",
                          "--batch-size")] = None,
    eval_batch_size: Annotated[int | None, opt("train.eval_batch_size", "Rows per evaluation "
                               "batch.", "--eval-batch-size")] = None,
    gradient_accumulation_steps: Annotated[int | None, opt("train.gradient_accumulation_steps",
                                           "Batches per optimizer step.",
                                           "--gradient-accumulation-steps")] = None,
    warmup_ratio: Annotated[float | None, opt("train.warmup_ratio", "Share of steps spent "
                            "warming up the learning rate.", "--warmup-ratio")] = None,
    weight_decay: Annotated[float | None, opt("train.weight_decay", "AdamW weight decay.",
                            "--weight-decay")] = None,
    lr_scheduler: Annotated[str | None, opt("train.lr_scheduler", "linear, cosine, constant, ... "
                            "(transformers' get_scheduler).", "--lr-scheduler")] = None,
    seed: Annotated[int | None, opt("train.seed", "Seed for data order and new weights.",
                                    "--seed")] = None,
    mixed_precision: Annotated[str | None, opt("train.mixed_precision", "no, bf16 or fp16 "
                               "(fp32 is fastest on CPUs without bf16).",
                               "--mixed-precision")] = None,
    gradient_checkpointing: Annotated[bool | None, opt("train.gradient_checkpointing", "Trade "
                                      "compute for memory.", "--gradient-checkpointing/"
                                      "--no-gradient-checkpointing")] = None,
    group_by_length: Annotated[bool | None, opt("train.group_by_length", "Batch rows of similar "
                               "length together.", "--group-by-length/--no-group-by-length")
                               ] = None,
    eval_steps: Annotated[int | None, opt("train.eval_steps", "Also evaluate (and checkpoint) "
                          "every N steps; 0 = each epoch only.", "--eval-steps")] = None,
    save_steps: Annotated[int | None, opt("train.save_steps", "Also checkpoint every N steps.",
                          "--save-steps")] = None,
    logging_steps: Annotated[int | None, opt("train.logging_steps", "Log loss and speed every N "
                             "steps.", "--logging-steps")] = None,
    metric_for_best: Annotated[str | None, opt("train.metric_for_best", "Keep the checkpoint best "
                               "at this metric (default: the task's).", "--metric-for-best")
                               ] = None,
    early_stopping_patience: Annotated[int | None, opt("train.early_stopping_patience", "Stop "
                                       "after N evaluations without improvement; 0 = never.",
                                       "--early-stopping-patience")] = None,
) -> None:
    """Fine-tune a pretrained checkpoint on TASK and write a run directory."""
    given = {k: v for k, v in locals().items() if k in option_paths()}
    get_task(task)
    cfg = load_config(task, recipe, {option_paths()[k]: v for k, v in given.items()}, overrides)
    from llmkit.train import finetune as run

    try:
        out = run(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoint is in {cfg.output}/checkpoints; "
              "continue with the same command and --resume", file=sys.stderr)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(out))


@app.command(epilog="[bold]Example[/]\n\n  llmkit predict --model runs/sst2 --input new.csv "
             "--output preds.jsonl")
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory or checkpoint.")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="Rows to predict (file or "
                     "Hub id).")] = None,
    question: Annotated[str | None, typer.Option(help="qa: one question (with --context).")
                        ] = None,
    context: Annotated[str | None, typer.Option(help="qa: the context to answer from.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="JSON-lines file to write; "
                      "without it, records are printed.")] = None,
    task: Annotated[str | None, typer.Option(help="Task, for a checkpoint that is not a run "
                    "directory.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 64,
    text_column: Annotated[str | None, typer.Option(help="Text column, if not the run's.")] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text column.")] = None,
) -> None:
    """Predict every row of a file with a fine-tuned model: label and score per row."""
    import json
    import tempfile

    from llmkit.predict import predict as run

    if question is not None and context is not None:
        rows = Path(tempfile.mkdtemp()) / "question.jsonl"
        rows.write_text(json.dumps({"question": question, "context": context}) + "\n",
                        encoding="utf-8")
        input, task = str(rows), task or "qa"
    if input is None:
        raise LlmkitError("give --input (or --question and --context for a qa model)")
    records = run(model, input, output, task, batch_size,
                  {"text_column": text_column, "text_pair_column": text_pair_column})
    if output is None:
        for record in records:
            typer.echo(json.dumps(record, ensure_ascii=False))
    else:
        typer.echo(f"{len(records)} predictions written to {output}")


GENERATE_EXAMPLES = """[bold]Examples[/]

  llmkit generate --model runs/gpt --prompt "Once upon a time" --stream

  llmkit generate -m runs/gpt -p "ROMEO:" --temperature 0.8 --top-p 0.95 --seed 1

  llmkit generate -m runs/gpt --input prompts.txt --output out.jsonl --batch-size 16

  llmkit generate -m runs/en-ro --prompt "The house is small."      # seq2seq runs too
"""


@app.command("generate", epilog=GENERATE_EXAMPLES)
def generate_text(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory, local checkpoint "
                     "or Hub id (causal or seq2seq).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One prompt.")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Prompts: .txt (one per "
                     "line) or .jsonl (a 'prompt' field).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON lines to write "
                      "(batch mode).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding "
                      "(implied by --temperature, --top-k, --top-p).")] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (default: the "
                         "model's generation config, e.g. what a seq2seq run evaluated with; "
                         "else 1).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Penalty > 1 discourages "
                                  "repeats.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string "
                    "(repeatable; left out of the output).")] = None,
    num_return_sequences: Annotated[int, typer.Option(help="Outputs per prompt.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed, for repeatable sampling.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the tokenizer's chat template.")
                    ] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 16,
) -> None:
    """Generate text with a causal or seq2seq model: one prompt, or a file of prompts."""
    import json

    from llmkit.generate import (
        GenerationSettings,
        generate,
        load_generator,
        read_prompts,
    )
    from llmkit.generate import (
        chat as templated,
    )

    if (prompt is None) == (input is None):
        raise LlmkitError("give either --prompt or --input")
    settings = GenerationSettings(
        max_new_tokens, sample or any(v is not None for v in (temperature, top_k, top_p)),
        temperature, top_k, top_p, num_beams, repetition_penalty, num_return_sequences,
        tuple(stop or ()), seed)
    if stream and (input or (num_beams or 1) > 1 or num_return_sequences > 1 or stop):
        raise LlmkitError("--stream prints one sequence for one --prompt: drop --input, "
                          "--num-beams, --num-return-sequences and --stop")
    from llmkit.tasks.seq2seq import run_prefix

    prompts = [prompt] if prompt is not None else read_prompts(str(input))
    net, tokenizer = load_generator(model)
    prefix = run_prefix(model, net.config)  # what a T5 run was trained with ('summarize: ')
    prompts = [prefix + p for p in prompts]
    if chat:
        prompts = [templated(tokenizer, p) for p in prompts]
    if stream:
        from transformers import TextStreamer

        generate(net, tokenizer, prompts, settings, streamer=TextStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True), templated=chat)
        return  # the streamer ends with a newline
    if output is None:
        for record in generate(net, tokenizer, prompts, settings, batch_size, templated=chat):
            outputs = record["output"] if num_return_sequences > 1 else [record["output"]]
            for text in outputs:
                typer.echo(text if input is None else json.dumps(record, ensure_ascii=False))
        return
    from rich.progress import Progress

    from llmkit.report import console

    with Progress(*Progress.get_default_columns(), "{task.fields[speed]}",
                  console=console) as progress:
        bar = progress.add_task("generating", total=len(prompts), speed="")
        tokens = [0]

        def advance(done: int, new: int) -> None:
            tokens[0] += new
            elapsed = progress.tasks[bar].elapsed or 1e-9
            progress.update(bar, advance=done, speed=f"{tokens[0] / elapsed:.1f} new tokens/s")

        records = generate(net, tokenizer, prompts, settings, batch_size, on_batch=advance,
                           templated=chat)
    from llmkit.predict import write_jsonl

    write_jsonl(records, output)
    typer.echo(f"{len(records)} generations written to {output}")


EVAL_EXAMPLES = """[bold]Examples[/]

  llmkit eval --metric bleu --metric chrf --predictions hyp.txt --references ref.txt

  llmkit eval -m bleu -p hyp.txt -r ref1.txt -r ref2.txt --tokenize intl --json

  llmkit eval -m squad_v2 -p predictions.json -r dev-v2.0.json

  llmkit eval -m accuracy -m macro_f1 --model runs/sst2 --data dev.tsv

  llmkit eval -m perplexity --model runs/gpt --data valid.txt
"""


@app.command("eval", epilog=EVAL_EXAMPLES)
def eval_files(
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="bleu, chrf, ter, rouge, "
                      "accuracy, f1, exact_match, squad, squad_v2 (repeatable).")],
    predictions: Annotated[str | None, typer.Option("--predictions", "-p", help="One "
                           "prediction per line (squad: JSON id -> answer).")] = None,
    references: Annotated[list[str] | None, typer.Option("--references", "-r", help="One "
                          "reference per line, aligned; repeat for several references (squad: "
                          "the data file).")] = None,
    model: Annotated[str | None, typer.Option(help="Score a model instead: a run directory (or "
                     "a checkpoint with --task) on --data.")] = None,
    data: Annotated[str | None, typer.Option(help="Labelled rows for --model: file or Hub id.")
                    ] = None,
    task: Annotated[str | None, typer.Option(help="Task of a --model that is not a run "
                    "directory.")] = None,
    split: Annotated[str, typer.Option(help="Hub split of --data.")] = "validation",
    text_column: Annotated[str | None, typer.Option(help="--model: text column, if not the "
                           "run's.")] = None,
    label_column: Annotated[str | None, typer.Option(help="--model: label column.")] = None,
    tokenize: Annotated[str | None, typer.Option(help="BLEU tokenizer (sacrebleu's: 13a, intl, "
                        "char, zh, none, ...).")] = None,
    lowercase: Annotated[bool, typer.Option("--lowercase", "-lc", help="Case-insensitive "
                         "BLEU.")] = False,
    chrf_word_order: Annotated[int, typer.Option(help="chrF word n-gram order; 2 = chrF++.")
                               ] = 0,
    chrf_lowercase: Annotated[bool, typer.Option(help="Case-insensitive chrF.")] = False,
    ter_case_sensitive: Annotated[bool, typer.Option(help="Case-sensitive TER (sacrebleu's "
                                  "TER ignores case by default).")] = False,
    confidence: Annotated[bool, typer.Option("--confidence", help="95% bootstrap interval for "
                          "BLEU/chrF/TER (sacrebleu's, seeded by SACREBLEU_SEED).")] = False,
    bootstrap_samples: Annotated[int, typer.Option(help="Resamples for --confidence and "
                                 "--baseline.")] = 1000,
    baseline: Annotated[str | None, typer.Option(help="A baseline system's predictions: paired "
                        "bootstrap p-value of the difference (as sacrebleu --paired-bs).")
                        ] = None,
    average: Annotated[str, typer.Option(help="F1 average: macro, micro or binary.")] = "macro",
    positive: Annotated[str, typer.Option(help="Positive label for binary F1.")] = "1",
    width: Annotated[int, typer.Option("--width", "-w", help="Decimals printed (sacrebleu's "
                     "default is 1).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the JSON "
                      "to this file.")] = None,
) -> None:
    """Score predictions against references with the reference tools' definitions, offline."""
    import json
    from dataclasses import asdict

    from llmkit.evaluate import score_files, score_model

    options = {"tokenize": tokenize, "lowercase": lowercase, "chrf_word_order": chrf_word_order,
               "chrf_lowercase": chrf_lowercase, "ter_case_sensitive": ter_case_sensitive,
               "average": average, "positive": positive, "confidence": confidence,
               "bootstrap_samples": bootstrap_samples, "baseline": baseline}
    if model is not None:
        scores = score_model(metric, model, data, task, split,
                             {"text_column": text_column, "label_column": label_column})
        payload: dict[str, Any] = {"model": model, "data": data}
    elif predictions is None or not references:
        raise LlmkitError("give --predictions and --references, or --model and --data")
    else:
        scores = score_files(metric, predictions, references, options)
        payload = {"predictions": predictions, "references": references}
    payload["scores"] = [asdict(s) for s in scores]
    if output:
        output.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "signature")
    table.columns[2].overflow = "fold"
    for score in scores:
        value = f"{score.value:.{width}f}"
        if "p_value" in score.details:
            value += (f" (baseline {score.details['baseline']:.{width}f}, "
                      f"p = {score.details['p_value']:.4f})")
        if "confidence_interval" in score.details:
            value += (f" (μ = {score.details['confidence_mean']:.{width}f} ± "
                      f"{score.details['confidence_interval']:.{width}f})")
        table.add_row(score.metric, value, score.signature)
    Console().print(table)


@recipes_app.command("list")
def recipes_list() -> None:
    """List shipped recipes and the command that runs each."""
    for name, path in sorted(shipped_recipes().items()):
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        typer.echo(f"{name:28} {first}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name.")]) -> None:
    """Print a shipped recipe."""
    from llmkit.config import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipes_app.command("copy")
def recipes_copy(name: Annotated[str, typer.Argument(help="Recipe name.")],
                 dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.")]
                 ) -> None:
    """Copy a shipped recipe to edit it."""
    from llmkit.config import find_recipe

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise LlmkitError(f"{target} exists; choose another destination")
    shutil.copyfile(source, target)
    typer.echo(str(target))


def main() -> None:
    """Entry point: LlmkitError -> one line on stderr and exit 1 (traceback with LLMKIT_DEBUG=1)."""
    from llmkit.report import setup_logging

    setup_logging()
    try:
        app()
    except LlmkitError as err:
        if os.environ.get("LLMKIT_DEBUG") == "1":
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)
