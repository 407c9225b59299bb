"""A table of bad inputs across every command: each ends in one `error:` line and a non-zero exit,
never a traceback, never the backstop's "unexpected" report (that is a bug to fix, and this test
fails on it). Run in-process through the real entry point (`llmkit.cli.main`), so it is fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmkit.cli import main

FT = ["finetune", "classify", "--model", "{bert}", "--train", "{toy}", "--output", "{tmp}/o"]
QA = ["finetune", "qa", "--model", "{bert}", "--train", "{squad}", "--output", "{tmp}/o"]
TR = ["finetune", "translate", "--model", "{t5}", "--train", "{trans}", "--output", "{tmp}/o",
      "--source-lang", "en", "--target-lang", "es"]
SU = ["finetune", "summarize", "--model", "{t5}", "--train", "{summ}", "--output", "{tmp}/o"]
GE = ["finetune", "generate", "--model", "{gpt2}", "--train", "{corpus}", "--output", "{tmp}/o"]
PR = ["predict", "--model", "{run}"]
GN = ["generate", "--model", "{gpt2}", "--prompt", "the"]
EV = ["eval", "-p", "{hyp}", "-r", "{ref}"]

CASES: list[tuple[list[str], str]] = [
    # finetune: numbers out of range
    ([*FT, "--batch-size", "0"], "train.batch_size must be at least 1, got 0"),
    ([*FT, "--batch-size", "-3"], "train.batch_size must be at least 1, got -3"),
    ([*FT, "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    ([*FT, "--epochs", "0"], "train.epochs must be at least 1"),
    ([*FT, "--learning-rate", "-1"], "train.learning_rate must be at least 0"),
    ([*FT, "--lr", "nan"], "train.learning_rate must be a number, got nan"),
    ([*FT, "--lr", "inf"], "train.learning_rate must be finite"),
    ([*FT, "--weight-decay", "-0.1"], "train.weight_decay must be at least 0"),
    ([*FT, "--warmup-ratio", "1.5"], "train.warmup_ratio must be below 1"),
    ([*FT, "--seed", "-1"], "train.seed must be at least 0"),
    ([*FT, "--seed", "99999999999"], "train.seed must be at most 4294967295"),
    ([*FT, "--max-length", "0"], "data.max_length must be at least 1"),
    ([*FT, "--gradient-accumulation-steps", "0"],
     "train.gradient_accumulation_steps must be at least 1"),
    ([*FT, "--eval-batch-size", "0"], "train.eval_batch_size must be at least 1"),
    ([*FT, "--logging-steps", "0"], "train.logging_steps must be at least 1"),
    ([*FT, "--eval-steps", "-1"], "train.eval_steps must be at least 0"),
    ([*FT, "--save-steps", "-1"], "train.save_steps must be at least 0"),
    ([*FT, "--max-grad-norm", "-1"], "train.max_grad_norm must be at least 0"),
    ([*FT, "--early-stopping-patience", "-1"], "train.early_stopping_patience must be at least 0"),
    ([*FT, "--validation-fraction", "1.5"], "data.validation_fraction must be below 1"),
    ([*FT, "--validation-fraction", "0"], "data.validation_fraction must be above 0"),
    ([*FT, "--max-train-samples", "0"], "data.max_train_samples must be at least 1"),
    ([*FT, "--max-eval-samples", "-2"], "data.max_eval_samples must be at least 1"),
    ([*FT, "--lr-scheduler", "bogus"],
     "train.lr_scheduler 'bogus' is not one of transformers' schedules: linear"),
    ([*FT, "--mixed-precision", "fp8x"],
     "train.mixed_precision: expected 'no' | 'bf16' | 'fp16', got 'fp8x'"),
    ([*FT, "--metric-for-best", "bogus"],
     "train.metric_for_best 'bogus' is not a metric of classify; choose one of eval_loss,"
     " accuracy"),
    # finetune: options, recipes, overrides
    ([*FT, "--bogus"], "No such option: --bogus (see llmkit finetune classify --help)"),
    ([*FT, "--doc-stride", "3"], "--doc-stride is an option of llmkit finetune qa"),
    ([*FT, "-s", "bogus=1"],
     "bogus: unknown key (known: task, model, output, tokenizer, config_overrides, "
     "from_scratch, data, train, adapter)"),
    ([*FT, "-s", "train.epochs=two"], "train.epochs: expected int, got 'two'"),
    ([*FT, "-s", "train.epochs=[1"], "override 'train.epochs=[1': the value is not valid YAML"),
    ([*FT, "-s", "noequals"], "override 'noequals' is not of the form section.key=value"),
    ([*FT, "-s", "data.doc_stride=3"], "a setting of qa"),
    ([*FT, "--recipe", "{tmp}/missing.yaml"],
     "no recipe file '{tmp}/missing.yaml' and no shipped recipe"),
    ([*FT, "--recipe", "{badyaml}"], "recipe {badyaml} is not valid YAML"),
    ([*FT, "--recipe", "{listyaml}"], "recipe {listyaml}: expected a mapping at the top level"),
    ([*FT, "--resume"], "--resume: no checkpoint in"),
    ([*FT, "--resume-from", "{tmp}/nowhere"], "is not an llmkit checkpoint"),
    ([*FT, "--resume", "--overwrite"], "contradict each other"),
    # finetune: the model
    (["finetune", "classify", "--model", "{tmp}/nowhere", "--train", "{toy}", "--output",
      "{tmp}/o"], "--model {tmp}/nowhere: no such checkpoint folder"),
    (["finetune", "classify", "--model", "{file}", "--train", "{toy}", "--output", "{tmp}/o"],
     "--model {file} is a file; give the folder that holds config.json"),
    (["finetune", "classify", "--model", "{emptydir}", "--train", "{toy}", "--output",
      "{tmp}/o"], "{emptydir} is not a model checkpoint: it has no config.json"),
    (["finetune", "classify", "--model", "{corrupt}", "--train", "{toy}", "--output", "{tmp}/o"],
     "its weights cannot be read (Error while deserializing header"),
    (["finetune", "classify", "--model", "{pickled}", "--train", "{toy}", "--output", "{tmp}/o"],
     "--model {pickled}: its pickled weights (.bin) hold more than tensors and were refused"),
    (["finetune", "classify", "--model", "bert-base-uncased", "--train", "{toy}", "--output",
      "{tmp}/o"], "the Hugging Face Hub cannot be reached"),
    # finetune: the data
    ([*FT[:5], "{tmp}/missing.csv", *FT[6:]], "--train {tmp}/missing.csv: no such file"),
    ([*FT[:5], "{tmp}", *FT[6:]], "--train {tmp} is a folder; give a file"),
    ([*FT[:5], "{empty}", *FT[6:]], "--train {empty}: could not be read as .tsv"),
    ([*FT[:5], "{unknownext}", *FT[6:]], "--train {unknownext}: unknown format '.xyz'"),
    ([*FT[:5], "{ragged}", *FT[6:]],
     "--train {ragged}: could not be read as .csv: Error tokenizing data"),
    ([*FT[:5], "{badjsonl}", *FT[6:]], "--train {badjsonl}: could not be read as .jsonl"),
    ([*FT, "--validation", "{tmp}/missing.tsv"], "--validation {tmp}/missing.tsv: no such file"),
    ([*FT, "--text-column", "sentence"], "no column 'sentence'; the columns are 'text', 'label'"),
    ([*FT, "--label-column", "y"], "--train: no column 'y'; the columns are 'text', 'label'"),
    ([*FT, "--text-pair-column", "other"], "--train: no column 'other'"),
    ([*FT, "--positive-label", "meh"],
     "data.positive_label 'meh' is not a label; the labels are bad, good"),
    ([*FT[:5], "{nolabel}", *FT[6:]],
     "7 of 14 rows have an empty text or label (first: {{'text': 'bad film', 'label': ''}}); fix"
     " the data or pass -s data.empty_rows=skip"),
    ([*FT[:5], "{emptytext}", *FT[6:]], "rows have an empty text or label (first: {{'text': ''"),
    ([*FT[:5], "{listtext}", *FT[6:]], "column 'text' holds list values, not text"),
    ([*FT[:5], "{numtext}", *FT[6:]], "column 'text' holds int64 values, not text"),
    ([*FT[:5], "{nulllabel}", *FT[6:]],
     "1 of 14 rows have an empty text or label (first: {{'text': 'film 3', 'label': None}})"),
    # finetune: the output folder
    ([*FT[:7], "{file}"], "--output {file} is a file; give a folder for the run"),
    ([*FT[:7], "{notrun}"], "is not empty"),
    ([*FT[:7], "{run}"], "holds a finished run"),
    # finetune --lora
    ([*FT, "--lora", "--lora-target-modules", "bogus"], "--lora-target-modules bogus: the model "
     "has no such linear layer; its linear layers are dense, key, query, value"),
    ([*FT, "--lora", "--lora-r", "0"], "adapter.lora_r must be at least 1, got 0"),
    ([*FT, "--lora", "--lora-alpha", "0"], "adapter.lora_alpha must be above 0, got 0"),
    ([*FT, "--max-steps", "-1"], "train.max_steps must be at least 0, got -1"),
    ([*FT, "--warmup-steps", "-5"], "train.warmup_steps must be at least 0, got -5"),
    ([*FT, "--on-nonfinite", "ignore"], "train.on_nonfinite: expected 'stop' | 'skip'"),
    ([*FT, "--max-nonfinite-steps", "-1"], "train.max_nonfinite_steps must be at least 0"),
    (["predict", "--model", "{nobase}", "-i", "{toy}", "--base-model", "{tmp}/gone"],
     "--base-model {tmp}/gone: no such checkpoint folder"),
    ([*FT, "--lora", "--lora-dropout", "1"], "adapter.lora_dropout must be below 1, got 1"),
    ([*FT, "--merge"], "--merge applies to adapter runs: add --lora"),
    ([*FT, "--load-in-4bit"], "--load-in-4bit applies to adapter runs: add --lora"),
    ([*FT, "--lora", "--from-scratch"], "--from-scratch trains every weight of a new model and "
     "--lora freezes the base model's: drop one of them"),
    # merge
    (["merge", "{run}", "-o", "{tmp}/m"], "{run} is not an adapter run (no adapter_config.json)"),
    (["merge", "{tmp}/nowhere", "-o", "{tmp}/m"], "{tmp}/nowhere: no such run directory"),
    (["merge", "{nobase}", "-o", "{tmp}/m"], "{nobase} is an adapter run whose base model "
     "/gone/base cannot be found; pass --base-model"),
    (["merge", "{adapter}", "-o", "{file}"], "--output {file} is not an empty folder"),
    (["merge", "{adapter}"], "Missing option '--output'"),
    (["predict", "--model", "{nobase}", "-i", "{toy}"], "pass --base-model"),
    (["generate", "--model", "{nobase}", "-p", "x"], "is a bert encoder: it cannot generate"),
    # finetune qa
    ([*QA, "--doc-stride", "0"], "data.doc_stride must be at least 1"),
    ([*QA, "--doc-stride", "300", "--max-length", "100"],
     "data.doc_stride (300) must be smaller than data.max_length (100)"),
    ([*QA, "--max-answer-length", "0"], "data.max_answer_length must be at least 1"),
    ([*QA, "--n-best", "0"], "data.n_best must be at least 1"),
    ([*QA, "--bad-answers", "maybe"], "data.bad_answers: expected 'fail' | 'skip', got 'maybe'"),
    ([*QA[:5], "{toy}", *QA[6:]], "--train: no column 'question', 'context', 'answers'"),
    ([*QA, "--question-column", "q"], "no column 'q'"),
    ([*QA[:5], "{badanswers}", *QA[6:]],
     "have answer text that does not occur at answer_start in the context (first: row 0)"),
    # finetune translate / summarize
    ([*TR[:-4], "--source-lang", "xx", "--target-lang", "es"],
     "--source-lang xx is not in the data; the languages there are en, es"),
    ([*TR, "--num-beams", "0"], "data.num_beams must be at least 1"),
    ([*TR, "--max-target-length", "0"], "data.max_target_length must be at least 1"),
    ([*TR, "--max-new-tokens", "0"], "data.max_new_tokens must be at least 1"),
    ([*TR, "--empty-rows", "keep"], "data.empty_rows: expected 'fail' | 'skip', got 'keep'"),
    ([*TR[:3], "{bert}", *TR[4:]],
     "is a bert checkpoint, which has no translate head in transformers; it fits: classify, qa"),
    ([*TR[:5], "{toy}", *TR[6:]], "--train: no column 'translation'"),
    ([*SU, "--text-column", "doc"], "no column 'doc'"),
    ([*SU, "--summary-column", "abstract"], "no column 'abstract'"),
    ([*SU[:5], "{emptysumm}", *SU[6:]], "7 of 7 rows have an empty source or target"),
    # finetune generate
    ([*GE, "--block-size", "0"], "data.block_size must be at least 1"),
    ([*GE, "--sample-by", "word"],
     "data.sample_by: expected 'document' | 'paragraph' | 'line', got 'word'"),
    ([*GE[:3], "{bert}", *GE[4:]], "is a bert checkpoint, which has no generate head"),
    ([*GE, "--prompt-column", "p"],
     "prompt/completion data needs both --prompt-column and --completion-column"),
    ([*GE[:5], "{pairs}", *GE[6:],
     "--prompt-column", "prompt", "--completion-column", "completion"],
     "rows have an empty completion (first: {{'prompt': 'q', 'completion': ''}})"),
    ([*GE[:5], "{empty}", *GE[6:]], "could not be read as .tsv"),
    ([*GE[:5], "{toy}", *GE[6:], "--text-column", "body"], "no column 'body'"),
    # finetune generate: conversations
    ([*GE[:5], "{chatbad}", *GE[6:], "--chat-template", "{template}"],
     ": messages must be a list of {{\"role\": ..., "),  # every row is bad
    ([*GE[:5], "{chats}", *GE[6:]], "the tokenizer has no chat template to render the "
     "conversations: give one with --chat-template FILE"),
    ([*GE[:5], "{chats}", *GE[6:], "--chat-template", "{tmp}/none.jinja"],
     "--chat-template {tmp}/none.jinja: no such file"),
    ([*GE, "--messages-column", "talk"], "--train: no column 'talk'"),
    # predict
    (["predict", "--model", "{tmp}/nowhere", "-i", "{toy}"],
     "--model {tmp}/nowhere: no such checkpoint folder"),
    (["predict", "--model", "{emptydir}", "-i", "{toy}"], "{emptydir} is not a model checkpoint"),
    (["predict", "--model", "{bert}", "-i", "{toy}"],
     "has no trained classify head (classifier.bias, classifier.weight are missing): fine-tune"
     " it first"),
    (["predict", "--model", "{bert}", "-i", "{toy}", "--task", "bogus"],
     "unknown task 'bogus'; the tasks are classify, qa"),
    ([*PR, "-i", "{tmp}/missing.csv"], "--input {tmp}/missing.csv: no such file"),
    ([*PR, "-i", "{toy}", "--batch-size", "0"],
     "Invalid value for '--batch-size': Input should be greater than or equal to 1"),
    ([*PR], "give --input (or --question and --context for a qa model)"),
    ([*PR, "-i", "{toy}", "--text-column", "nope"], "--input: no column 'nope'"),
    ([*PR, "-i", "{toy}", "--output", "{tmp}"], "--output {tmp} is a folder; give a file name"),
    ([*PR, "-i", "{toy}", "--output", "{tmp}/no/dir/p.jsonl"],
     "folder {tmp}/no/dir does not exist; create it first"),
    ([*PR, "--question", "who?", "--context", "ann"],
     "is a classify run: it does not do qa (--question and --context are for qa runs)"),
    ([*PR, "-i", "{listtext}"], "column 'text' holds list values, not text"),
    # generate
    (["generate", "--model", "{gpt2}"], "give either --prompt or --input"),
    ([*GN, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    ([*GN, "--num-beams", "0"], "--num-beams must be at least 1, got 0"),
    ([*GN, "--temperature", "0"], "--temperature must be above 0, got 0"),
    ([*GN, "--temperature", "-1"], "--temperature must be above 0, got -1"),
    ([*GN, "--top-p", "0"], "--top-p must be above 0, got 0"),
    ([*GN, "--top-p", "1.5"], "--top-p must be at most 1, got 1.5"),
    ([*GN, "--top-k", "-1"], "--top-k must be at least 1, got -1"),
    ([*GN, "--num-return-sequences", "0"], "--num-return-sequences must be at least 1, got 0"),
    ([*GN, "--num-return-sequences", "3"],
     "--num-return-sequences 3 needs --sample, or --num-beams 3"),
    ([*GN, "--repetition-penalty", "0"], "--repetition-penalty must be above 0, got 0"),
    ([*GN, "--batch-size", "0"],
     "Invalid value for '--batch-size': Input should be greater than or equal to 1"),
    ([*GN, "--seed", "-4"], "--seed must be at least 0, got -4"),
    ([*GN, "--input", "{hyp}"], "give either --prompt or --input"),
    ([*GN, "--chat"], "--chat: this tokenizer has no chat template"),
    ([*GN, "--system", "be brief"], "--system is a message of a conversation: add --chat"),
    (["generate", "--model", "{tmp}/nowhere", "-p", "x"],
     "--model {tmp}/nowhere: no such checkpoint folder"),
    (["generate", "--model", "{bert}", "-p", "x"],
     "is a bert encoder: it cannot generate text; it fits: classify, qa"),
    (["generate", "--model", "{gpt2}", "--input", "{tmp}/missing.txt"],
     "--input {tmp}/missing.txt: no such file"),
    (["generate", "--model", "{gpt2}", "--input", "{noprompt}"],
     "every line must be a JSON object with a 'prompt' field"),
    (["generate", "--model", "{gpt2}", "--input", "{hyp}", "-o", "{tmp}/no/dir/out.jsonl"],
     "folder {tmp}/no/dir does not exist; create it first"),
    (["generate", "--model", "{gpt2}", "--input", "{hyp}", "-o", "{tmp}"],
     "--output {tmp} is a folder"),
    # eval
    (["eval", "-m", "bogus", "-p", "{hyp}", "-r", "{ref}"],
     "unknown metric 'bogus'; the built-in metrics are bleu"),
    (["eval", "-m", "bleu"], "give --predictions and --references, or --model and --data"),
    (["eval", "-m", "bleu", "-p", "{tmp}/missing.txt", "-r", "{ref}"],
     "--predictions {tmp}/missing.txt: no such file"),
    (["eval", "-m", "bleu", "-p", "{hyp}", "-r", "{short}"],
     "has 2 lines but --references {short} has 1; they must align line by line"),
    ([*EV, "-m", "bleu", "--tokenize", "bogus"],
     "--tokenize bogus: sacrebleu's tokenizers are none, zh, 13a"),
    ([*EV, "-m", "f1", "--average", "bogus"],
     "--average: expected 'macro' | 'micro' | 'weighted' | 'binary', got 'bogus'"),
    ([*EV, "-m", "accuracy", "-r", "{ref}"],
     "-m accuracy compares each line with one reference, got 2 reference files"),
    (["eval", "-p", "{labels}", "-r", "{labels}", "-m", "f1", "--average", "binary",
      "--positive", "meh"], "the positive label 'meh' is not one of the labels: neg, pos"),
    ([*EV, "-m", "bleu", "--width", "-1"], "Invalid value for '--width' / '-w'"),
    ([*EV, "-m", "chrf", "--confidence", "--bootstrap-samples", "0"],
     "--bootstrap-samples must be at least 1, got 0"),
    ([*EV, "-m", "chrf", "--chrf-word-order", "-1"],
     "--chrf-word-order must be at least 0, got -1"),
    ([*EV, "-m", "bleu", "--baseline", "{short}"],
     "--baseline {short} has 1 lines but --predictions has 2"),
    ([*EV, "-m", "bleu", "--output", "{tmp}/no/dir/x.json"], "folder {tmp}/no/dir does not exist"),
    ([*EV, "-m", "perplexity"], "-m perplexity scores a model, not files: give --model RUN"),
    (["eval", "-m", "squad", "-p", "{hyp}", "-r", "{squad}"],
     "--predictions {hyp}: expected a JSON object of question id -> answer text"),
    (["eval", "-m", "squad", "-p", "{squadpred}", "-r", "{ref}"],
     "--references {ref}: no SQuAD questions found"),
    (["eval", "-m", "accuracy", "--model", "{run}", "--data", "{tmp}/missing.tsv"],
     "--data {tmp}/missing.tsv: no such file"),
    (["eval", "-m", "accuracy", "--model", "{run}", "--data", "{otherlabels}"],
     "labels the model does not know: positive-ish; its labels are bad, good"),
    (["eval", "-m", "bleu", "--model", "{run}", "--data", "{toy}"],
     "metric 'bleu' does not fit a classify model; its metrics are eval_loss, accuracy"),
    (["eval", "-m", "accuracy", "--model", "{run}"], "--model needs --data: the labelled rows"),
    (["finetune", "classify", "--model", "{tmp}/nomodel", "--train", "{tmp}/none.tsv",
      "--output", "{toy}/run"],  # every path problem at once, before torch loads
     "--model {tmp}/nomodel: no such checkpoint folder; --train {tmp}/none.tsv: no such file; "
     "--output {toy}/run: {toy} is a file, not a folder"),
    (["eval", "-m", "rolling_perplexity", "--model", "{run}", "--data", "{toy}"],
     "is a classify model: rolling_perplexity, word_perplexity, byte_perplexity, bits_per_byte "
     "and --stride score plain text with a language model"),
    # recipes
    (["recipes", "show", "bogus"],
     "no recipe file 'bogus' and no shipped recipe of that name; shipped recipes: classify-mrpc"),
    (["recipes", "copy", "bogus", "{tmp}"], "no recipe file 'bogus'"),
    (["recipes", "copy", "classify-sst2", "{tmp}/no/dir/x.yaml"],
     "{tmp}/no/dir is not a folder; create it first"),
    (["recipes", "copy", "classify-sst2", "{file}"], "{file} exists; choose another destination"),
    (["nonsense"], "No such command 'nonsense'. (see llmkit --help)"),
    ([*FT, "--dry-run=soon"], "Option '--dry-run' does not take a value"),
    ([*FT, "--report-to", "tensorbored"], "--report-to tensorbored: no such tracker"),
    (["push", "{tmp}", "--repo-id", "me/run"], "is not a finished run (no metrics.json)"),
    (["push", "{tmp}/nothing", "--repo-id", "me/run"], "{tmp}/nothing: no such run directory"),
    (["plot", "{tmp}"], "is not a finished run (no metrics.json)"),
    # issue 40: named problems instead of "failed unexpectedly", and misleading refusals
    (["finetune", "classify", "--model", "{bert}", "--train", "{toy}", "--output", "{file}/run"],
     "--output {file}/run: {file} is a file, not a folder"),
    ([*PR, "-i", "{nulltext}"], "--input {nulltext}: 1 of 3 rows have no text in column 'text'"
     " (first: row 1); fill them in or remove those rows"),
    ([*FT, "--lora", "--lora-target-modules", "classifier"], "--lora-target-modules classifier: "
     "that is the task head, which trains in full beside the adapters (peft's modules_to_save); "
     "target the model's linear layers: dense, key, query, value"),
    (["plot", "{torn}"], "{torn}/metrics.json is damaged (Expecting ':' delimiter at line 1)"),
    (["plot", "{halfmetrics}"], "metrics.json is damaged (no final step and history)"),
    (["plot", "{run}", "-o", "{tmp}/no/x.png"],
     "--output {tmp}/no/x.png: folder {tmp}/no does not exist; create it first"),
    (["plot", "{run}", "-o", "{tmp}/x.txt"],
     "--output {tmp}/x.txt: name a picture file (avif, eps, gif, jpeg, jpg, pdf"),
    (["merge", "{adapter}", "--base-model", "{gpt2}", "-o", "{tmp}/m"],
     "{gpt2} is a gpt2 model and the adapter of {adapter} was trained on a bert one: give its "
     "base model with --base-model"),
    (["predict", "--model", "{adapter}", "--base-model", "{gpt2}", "-i", "{toy}"],
     "{gpt2} is a gpt2 model and the adapter of {adapter} was trained on a bert one"),
    (["generate", "--model", "{gpt2}", "--chat", "-i", "{chatrows}"],
     "--input {chatrows}: row 2: unknown role 'bot'; the roles are system, user"),
    (["generate", "--model", "{gpt2}", "-i", "{tornprompts}"],
     "--input {tornprompts}: row 1 is not JSON (Expecting value); every line must be a JSON"),
    ([*FT, "--measure"], "--measure and --json describe a --dry-run: add --dry-run"),
    ([*FT, "--json"], "--measure and --json describe a --dry-run: add --dry-run"),
    (["finetune", "translate", "--model", "{t5}", "--train", "{halfpairs}", "--output",
      "{tmp}/o", "--source-lang", "en", "--target-lang", "es"],
     "rows have an empty source or target; fix the data or pass -s data.empty_rows=skip"),
    ([*GE, "--tokenizer", "{bert}"], "the tokenizer has no end-of-sequence token"),
    ([*GE, "--from-scratch", "--config-overrides", "n_head=3"],
     "--config-overrides 'n_head=3': the model cannot be built so (`embed_dim` must be divisible"),
    ([*FT[:5], "{nanlabel}", "--output", "{tmp}/o"],
     "rows have an empty text or label"),
    ([*FT[:5], "{jsonlist}", "--json-field", "rows", "--output", "{tmp}/o"],
     "holds a JSON list, not an object with keys: drop --json-field rows"),
    ([*FT, "--test", "{notext}"], "--test: no column 'text'"),
    ([*GE, "--from-scratch", "--config-overrides", "activation_function=bogus"],
     "--config-overrides 'activation_function=bogus': the model cannot be built so (KeyError: "
     "'bogus')"),
    ([*FT, "--config-overrides", "hidden_dropout_prob=2"],
     "the model cannot be built so (dropout probability has to be between 0 and 1"),
]


if not __import__("torch").cuda.is_available():  # where it could run, it is no mistake
    CASES.append(([*FT, "--lora", "--load-in-4bit"], "--load-in-4bit needs a CUDA GPU"))


@pytest.fixture(scope="module")
def files(tiny_bert: Path, tiny_gpt2: Path, tiny_seq2seq, toy: dict[str, Path],
          toy_translation: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, str]:
    """Every path the table names; {tmp} is filled in per case."""
    import torch

    folder = tmp_path_factory.mktemp("bad")

    def write(name: str, text: str) -> str:
        (folder / name).write_text(text, encoding="utf-8")
        return str(folder / name)

    emptydir = folder / "emptydir"
    emptydir.mkdir()
    corrupt = folder / "corrupt"
    pickled = folder / "pickled"
    for broken in (corrupt, pickled):
        broken.mkdir()
        for item in Path(tiny_bert).iterdir():
            if item.suffix != ".safetensors":
                (broken / item.name).write_bytes(item.read_bytes())
    weights = (Path(tiny_bert) / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    torch.save({"not": "weights", "call": print}, pickled / "pytorch_model.bin")
    notrun = folder / "notrun"
    notrun.mkdir()
    (notrun / "keep.txt").write_text("mine")
    squad = [{"id": "1", "question": "who?", "context": "ann did it",
              "answers": {"text": ["ann"], "answer_start": [0]}}] * 8
    summ = [{"text": "the film is good and the cast is great", "summary": "good film"}] * 8
    paths = {
        "bert": str(tiny_bert), "gpt2": str(tiny_gpt2), "t5": str(tiny_seq2seq("t5")),
        "toy": str(toy["train"]), "trans": str(toy_translation["train"]),
        "emptydir": str(emptydir), "corrupt": str(corrupt), "pickled": str(pickled),
        "notrun": str(notrun), "run": str(finished_run(tiny_bert, toy, folder / "run")),
        "adapter": str(finished_run(tiny_bert, toy, folder / "adapter", lora=True)),
        "file": write("file.txt", "a\nb\n"),
        "empty": write("empty.tsv", ""),
        "unknownext": write("data.xyz", "text\tlabel\ngood\t1\n"),
        "ragged": write("ragged.csv", "text,label\ngood,1\nbad,0,extra,more\n"),
        "badjsonl": write("bad.jsonl", '{"text": "a", "label": 1}\n{"text": \n'),
        "badyaml": write("bad.yaml", "train: [1\n"),
        "listyaml": write("list.yaml", "- 1\n- 2\n"),
        "nolabel": write("nolabel.tsv", "text\tlabel\n" + "good film\tpos\nbad film\t\n" * 8),
        "nulllabel": write("nulllabel.jsonl", "".join(json.dumps(
            {"text": f"film {i}", "label": None if i == 3 else i % 2}) + "\n" for i in range(16))),
        "emptytext": write("emptytext.tsv", "text\tlabel\n" + "good film\tpos\n\tneg\n" * 8),
        "listtext": write("listtext.jsonl", "".join(json.dumps(
            {"text": ["good", "film"], "label": i % 2}) + "\n" for i in range(16))),
        "numtext": write("numtext.jsonl", "".join(json.dumps(
            {"text": i, "label": i % 2}) + "\n" for i in range(16))),
        "squad": write("squad.jsonl", "".join(json.dumps(r) + "\n" for r in squad)),
        "badanswers": write("badanswers.jsonl", "".join(json.dumps(
            {**r, "answers": {"text": ["bob"], "answer_start": [0]}}) + "\n" for r in squad)),
        "summ": write("summ.jsonl", "".join(json.dumps(r) + "\n" for r in summ)),
        "nanlabel": write("nanlabel.tsv", "text\tlabel\n" + "good film\tpos\nbad film\tneg\n" * 8
                          + "odd film\tNaN\n"),
        "jsonlist": write("list.json", json.dumps([{"text": "a", "label": 1}] * 4)),
        "notext": write("notext.tsv", "review\tlabel\ngood film\tpos\n"),
        "halfpairs": write("halfpairs.jsonl", "".join(json.dumps(
            {"translation": {"en": "the house", "es": "la casa"}}) + "\n" for _ in range(6))
            + json.dumps({"translation": {"en": "a dog"}}) + "\n"),
        "nulltext": write("nulltext.jsonl", '{"text": "a"}\n{"text": null}\n{"text": "b"}\n'),
        "torn": str(torn_run(folder / "torn")),
        "halfmetrics": str(torn_run(folder / "half", "{}")),
        "chatrows": write("chatrows.jsonl", "".join(json.dumps({"messages": [
            {"role": role, "content": "hi"}]}) + "\n" for role in ("user", "system", "bot"))),
        "tornprompts": write("tornprompts.jsonl", '{"prompt": "a"}\n{"prompt": \n'),
        "emptysumm": write("emptysumm.jsonl", "".join(json.dumps(
            {**r, "summary": ""}) + "\n" for r in summ)),
        "corpus": write("corpus.txt", "the quick brown fox jumps over the lazy dog\n\n" * 40),
        "pairs": write("pairs.jsonl", "".join(json.dumps(
            {"prompt": "q", "completion": "" if i == 2 else "a"}) + "\n" for i in range(8))),
        "labels": write("labels.txt", "pos\nneg\n"),
        "chatbad": write("chatbad.jsonl", '{"messages": "hello"}\n' * 8),
        "template": write("plain.jinja", "{% for m in messages %}{{ m['content'] }}\n"
                          "{% endfor %}"),
        "chats": write("chats.jsonl", "".join(json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
            + "\n" for _ in range(8))),
        "hyp": write("hyp.txt", "the cat sat\na dog ran\n"),
        "ref": write("ref.txt", "the cat sat\nthe dog ran\n"),
        "short": write("short.txt", "the cat sat\n"),
        "noprompt": write("noprompt.jsonl", '{"text": "hello"}\n'),
        "squadpred": write("squadpred.json", '{"1": "ann"}'),
        "otherlabels": write("other.tsv", "text\tlabel\ngood film\tpositive-ish\n"),
    }
    import shutil

    nobase = shutil.copytree(paths["adapter"], folder / "nobase")
    adapter = json.loads((nobase / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = "/gone/base"
    (nobase / "adapter_config.json").write_text(json.dumps(adapter))
    return {**paths, "nobase": str(nobase)}


def finished_run(tiny_bert: Path, toy: dict[str, Path], out: Path, lora: bool = False) -> Path:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    cfg = load_config("classify", None, {"model": str(tiny_bert), "output": str(out),
                                         "data.train": str(toy["train"]), "train.epochs": 1,
                                         "adapter.lora": lora})
    return finetune(cfg)


def torn_run(folder: Path, text: str = '{"final": {"step"') -> Path:
    """A run folder whose metrics.json was cut off mid-write."""
    folder.mkdir()
    (folder / "metrics.json").write_text(text, encoding="utf-8")
    return folder


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch) -> tuple[int, str]:
    """`llmkit ARGV` in this process: exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *argv])
    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    code: int | str | None = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(
    a for a in c[0] if not a.startswith("{"))[:60] for c in CASES])
def test_bad_input_is_one_line(argv: list[str], expected: str, files: dict[str, str],
                               tmp_path: Path, capsys, monkeypatch) -> None:
    fill = {**files, "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    code, err = run_main(argv, capsys, monkeypatch)
    assert code != 0, err
    assert "Traceback" not in err, err
    assert "unexpected" not in err, err  # the backstop caught it: a message is missing
    assert expected.format(**fill) in err, err


QUICK = [["finetune", "classify", "--model", "{tmp}/nope", "--train", "t.tsv", "--output", "o"],
         ["finetune", "classify", "--model", "{tmp}/model", "--train", "t.tsv", "--output",
          "{tmp}/model/config.json/run"],
         ["predict", "--model", "{tmp}/nope", "-i", "t.tsv"],
         ["predict", "--model", "{tmp}/model", "-i", "t.tsv", "-o", "{tmp}/no/p.jsonl"],
         ["generate", "--model", "{tmp}/nope", "-p", "hi"],
         ["merge", "{tmp}/nope", "-o", "{tmp}/m"], ["merge", "{tmp}/model", "-o", "{tmp}/m"]]


def test_path_mistakes_are_refused_before_torch_loads(tmp_path: Path) -> None:
    """A mistyped --model or run folder, or an --output that cannot be written, is refused
    before torch, transformers and datasets are imported (seconds on a loaded machine)."""
    import subprocess

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argvs = [[a.format(tmp=tmp_path) for a in argv] for argv in QUICK]
    script = ("import sys\nfrom llmkit.cli import main\n"
              f"for argv in {argvs!r}:\n"
              "    sys.argv = ['llmkit', *argv]\n"
              "    try:\n        main()\n    except SystemExit as stop:\n"
              "        assert stop.code == 1, argv\n"
              "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(QUICK) and all(line.startswith("error: ") for line in lines), lines
    assert "no such checkpoint folder" in lines[0] and "is a file, not a folder" in lines[1]
    assert "no such run directory" in lines[5] and "is not an adapter run" in lines[6]
