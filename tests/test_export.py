"""llmkit export on tiny runs: the ONNX graph answers as the PyTorch model (logits to the
tolerance, the same predictions and greedy generations), int8 reports its metrics and size, a
broken export fails in one line, bad input is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.export import export
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from tests.conftest import CORPUS
from tests.test_chat import CHATML

pytest.importorskip("onnxruntime")


def tiny_run(task: str, model: Path, data: dict[str, Path], out: Path, **extra: object) -> Path:
    options = {"model": str(model), "output": str(out), "data.train": str(data["train"]),
               "data.validation": str(data["validation"]), "train.batch_size": 8,
               "train.learning_rate": 1e-2, "train.max_steps": 3, **extra}
    return finetune(load_config(task, None, options))


@pytest.fixture(scope="module")
def classify_export(tiny_bert: Path, toy: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A LoRA adapter run (merged on the way), exported with its int8 graph; the full-model
    path is the generate test's."""
    folder = tmp_path_factory.mktemp("export")
    run = tiny_run("classify", tiny_bert, toy, folder / "run",
                   **{"adapter.lora": True, "adapter.lora_r": 4})
    assert (run / "adapter_model.safetensors").is_file()
    report = export(run, folder / "onnx", quantize="int8")
    return run, folder / "onnx", report


def test_export_answers_as_pytorch(classify_export: tuple[Path, Path, dict],
                                   toy: dict[str, Path]) -> None:
    import onnxruntime
    from transformers import AutoTokenizer

    from llmkit.inference.predict import prepare

    run, out, report = classify_export
    assert {"model.onnx", "model.int8.onnx", "config.json", "config.yaml", "tokenizer.json",
            "README.md", "export.json"} <= {p.name for p in out.iterdir()}
    assert report["check"]["largest_difference"] <= 1e-4
    assert report["check"]["predictions_differ"] == 0 and report["check"]["rows"] == 30
    assert report["check"]["metrics"]["accuracy"] == report["check"]["onnx_metrics"]["accuracy"]
    assert json.loads((out / "export.json").read_text())["check"] == report["check"]
    # as the README says: plain onnxruntime, any batch size and length, the PyTorch logits
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    net = prepare(str(run), None, None)[2].eval()  # the adapter merged into its base
    texts = [line.split("\t")[0] for line in toy["validation"].read_text().splitlines()[1:]]
    for batch in (texts[:1], texts[:7]):
        feed = dict(tokenizer(batch, padding=True, return_tensors="np"))
        logits = session.run(["logits"], {i.name: feed[i.name] for i in session.get_inputs()})
        with torch.inference_mode():
            ours = net(**tokenizer(batch, padding=True, return_tensors="pt")).logits.numpy()
        np.testing.assert_allclose(logits[0], ours, atol=1e-4)
        assert (logits[0].argmax(-1) == ours.argmax(-1)).all()


def test_int8_reports_its_metrics_and_size(classify_export: tuple[Path, Path, dict]) -> None:
    _, out, report = classify_export
    q = report["quantized"]
    assert q["file"] == "model.int8.onnx" and q["size_mb"] < q["fp32_size_mb"]
    assert {"accuracy", "eval_loss"} <= set(q["metrics"]) and q["fp32_metrics"]
    assert 0 < q["largest_difference"] < 1  # quantization moves the logits, a little
    assert "int8" in (out / "README.md").read_text()


def test_a_finished_export_needs_overwrite(classify_export: tuple[Path, Path, dict]) -> None:
    run, out, _ = classify_export
    with pytest.raises(LlmkitError, match="holds a finished export: add --overwrite"):
        export(run, out)


def test_a_broken_export_fails_with_the_figures(classify_export: tuple[Path, Path, dict],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit.export import check, exporter

    run, out, _ = classify_export

    def copy_graph(model, tokenizer, path, opset):  # the good graph, without the wait
        shutil.copyfile(out / "model.onnx", path)
        return ["input_ids", "attention_mask"]

    answer = check.OrtModel.__call__

    def off(self, **batch):  # an export whose logits are 0.01 off
        found = answer(self, **batch)
        found.logits = found.logits + 0.01
        return found

    monkeypatch.setattr(exporter, "export_graph", copy_graph)
    monkeypatch.setattr(check.OrtModel, "__call__", off)
    with pytest.raises(LlmkitError) as err:
        export(run, tmp_path / "broken")
    line = str(err.value)
    assert "\n" not in line and "largest logit difference 0.01" in line
    assert "tolerance 0.0001" in line and "nothing was written" in line
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken-*"))


def test_bad_input_is_one_clear_line(classify_export: tuple[Path, Path, dict],
                                     tmp_path: Path) -> None:
    run, _, _ = classify_export
    empty = tmp_path / "empty-run"
    empty.mkdir()
    shutil.copyfile(run / "config.yaml", empty / "config.yaml")
    cases = [(dict(run=empty), "has no weights"),
             (dict(run=tmp_path / "nowhere"), "no such run directory"),
             (dict(format="gguf"), "--format gguf: the formats are onnx"),
             (dict(opset=7), "--opset 7 is out of range: give 14 to"),
             (dict(quantize="int4"), "--quantize int4: the onnx exporter quantizes to int8"),
             (dict(tolerance=0.0), "--tolerance 0.0: give a positive number"),
             (dict(output=run), "--output is the run directory itself")]
    for given, message in cases:
        args = {"run": run, "output": tmp_path / "out", **given}
        with pytest.raises(LlmkitError, match=message):
            export(**args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_the_command_prints_the_figures(classify_export: tuple[Path, Path, dict],
                                        tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from llmkit.cli.export import export as command

    run, out, _ = classify_export
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, [str(run), "--output", str(out), "--opset", "3"])
    assert result.exit_code == 1 and "--opset 3 is out of range" in str(result.exception)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text("\n\n".join(CORPUS * 4))
    (folder / "valid.txt").write_text("\n\n".join(CORPUS))
    return {"train": folder / "train.txt", "validation": folder / "valid.txt"}


@pytest.fixture(scope="module")
def generate_export(tiny_gpt2: Path, corpus: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A full (not adapter) generate run, exported."""
    folder = tmp_path_factory.mktemp("generate-export")
    run = tiny_run("generate", tiny_gpt2, corpus, folder / "run", **{"data.block_size": 16})
    return run, folder / "onnx", export(run, folder / "onnx")


def test_generate_export_generates_as_pytorch(generate_export: tuple[Path, Path, dict]) -> None:
    _, out, report = generate_export
    assert report["check"]["largest_difference"] <= 1e-4
    assert report["check"]["metrics"]["perplexity"] == pytest.approx(
        report["check"]["onnx_metrics"]["perplexity"], rel=1e-5)
    generations = report["generations"]
    assert generations["prompts"] == len(CORPUS) and generations["differ"] == 0
    assert report["cache"] and report["files"] == ["model.onnx", "model_with_past.onnx"]
    assert "model_with_past.onnx" in (out / "README.md").read_text()
    assert (out / "generation_config.json").is_file()


def llmkit(*args: object, input: str | None = None) -> object:
    """The command line, in this process: its result (exit code, output, exception)."""
    from typer.testing import CliRunner

    from llmkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scores(*args: object) -> dict[str, float]:
    done = llmkit("eval", *args, "--json")
    assert done.exit_code == 0, done.output
    return {s["metric"]: s["value"] for s in json.loads(done.stdout)["scores"]}


def test_predict_and_eval_on_the_export_answer_as_the_run(
        classify_export: tuple[Path, Path, dict], toy: dict[str, Path], tmp_path: Path) -> None:
    from llmkit.inference.ort import OrtModel
    from llmkit.inference.predict import prepare

    run, out, report = classify_export
    assert isinstance(prepare(str(out), None, None)[2], OrtModel)  # not the run's weights
    for model, name in ((run, "run"), (out, "onnx"), (out / "model.int8.onnx", "int8")):
        done = llmkit("predict", "--model", model, "--input", toy["validation"], "--output",
                      tmp_path / f"{name}.jsonl")
        assert done.exit_code == 0, done.output
    ours, theirs = records(tmp_path / "run.jsonl"), records(tmp_path / "onnx.jsonl")
    assert len(ours) == 30 and [r["text"] for r in theirs] == [r["text"] for r in ours]
    assert [r["label"] for r in theirs] == [r["label"] for r in ours]
    assert [r["score"] for r in theirs] == pytest.approx([r["score"] for r in ours], abs=1e-5)
    assert len(records(tmp_path / "int8.jsonl")) == 30  # the int8 graph, named as the model
    metrics = ("-m", "accuracy", "-m", "macro_f1", "-m", "eval_loss", "--data", toy["validation"])
    expected, found = scores("--model", run, *metrics), scores("--model", out, *metrics)
    assert found == pytest.approx(expected, abs=1e-5)
    assert found["accuracy"] == report["check"]["onnx_metrics"]["accuracy"]
    int8 = scores("--model", out / "model.int8.onnx", *metrics)
    # activations are quantized per batch: eval's batches are not the check's
    assert int8["accuracy"] == pytest.approx(report["quantized"]["metrics"]["accuracy"], abs=0.1)
    refused = llmkit("generate", "--model", out, "--prompt", "the film")
    assert refused.exit_code == 1 and "ONNX export of a classify run: it cannot generate text" \
        in str(refused.exception)


def test_generate_and_eval_on_the_export_answer_as_the_run(
        generate_export: tuple[Path, Path, dict], corpus: dict[str, Path], tmp_path: Path) -> None:
    from llmkit.inference.generate import load_prompts
    from llmkit.inference.ort import OrtCausalLM

    run, out, _ = generate_export
    exported = load_prompts(str(out), [])[0]
    assert isinstance(exported, OrtCausalLM) and exported.with_past is not None  # its cache
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(text.split(" ", 3)[-1] for text in CORPUS[:6]) + "\n")
    runs = {"greedy": ("--max-new-tokens", 10), "beams": ("--num-beams", 3,
                                                          "--num-return-sequences", 2,
                                                          "--max-new-tokens", 6),
            "sampled": ("--temperature", 0.9, "--top-k", 20, "--seed", 1, "--max-new-tokens", 6)}
    for name, options in runs.items():
        for model in (run, out):
            done = llmkit("generate", "--model", model, "--input", prompts, "--output",
                          tmp_path / f"{name}-{model.name}.jsonl", *options)
            assert done.exit_code == 0, done.output
        assert records(tmp_path / f"{name}-onnx.jsonl") == records(tmp_path / f"{name}-run.jsonl")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    talks = [llmkit("chat", model, "--chat-template", template, "--max-new-tokens", 6,
                    input="the cat\nthe dog\n") for model in (run, out, out / "model.onnx")]
    assert all(t.exit_code == 0 for t in talks), [t.output for t in talks]
    assert talks[1].stdout == talks[0].stdout == talks[2].stdout
    metrics = ("-m", "perplexity", "-m", "rolling_perplexity", "--data", corpus["validation"])
    assert scores("--model", out, *metrics) == pytest.approx(
        scores("--model", run, *metrics), rel=1e-5)
    refused = llmkit("generate", "--model", out, "--prompt", "the", "--base-model", run)
    assert refused.exit_code == 1 and "is an ONNX export of a whole model" in str(
        refused.exception) and "drop --base-model" in str(refused.exception)
    refused = llmkit("finetune", "generate", "--model", out, "--train", corpus["train"],
                     "--output", tmp_path / "again")
    assert refused.exit_code == 1 and "is an llmkit export (ONNX): it holds no PyTorch weights" \
        in str(refused.exception)


def test_a_generate_export_without_its_cache_still_answers(
        generate_export: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """An export without model_with_past.onnx (torch.onnx could not trace it): every step runs
    the whole sequence, with the same generations."""
    run, out, _ = generate_export
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("model_with_past*"))
    options = ("--prompt", "the cat", "--max-new-tokens", 8, "--num-beams", 2)
    expected, found = llmkit("generate", "--model", run, *options), llmkit(
        "generate", "--model", bare / "model.onnx", *options)
    assert found.exit_code == 0 and found.stdout == expected.stdout, found.output
    with_past = llmkit("generate", "--model", out / "model_with_past.onnx", *options)
    assert with_past.exit_code == 0 and with_past.stdout == expected.stdout, with_past.output


def test_a_causal_lm_torch_onnx_cannot_cache_is_exported_without(
        tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.export import causal

    def fake_export(module, model, args, kwargs, outputs, dynamic, path, opset, inputs=None):
        if path.name == "model_with_past.onnx":
            raise LlmkitError("torch.onnx cannot export GPT2LMHeadModel (gpt2) at opset 18: ...")
        path.write_bytes(b"")

    monkeypatch.setattr(causal, "export_module", fake_export)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    attention = model.config._attn_implementation
    report = causal.export_causal(model, AutoTokenizer.from_pretrained(tiny_gpt2), tmp_path, 18)
    assert report["files"] == ["model.onnx"] and report["cache"] is False
    assert "no KV cache" in report["notes"][0]
    assert model.config._attn_implementation == attention


@pytest.fixture(scope="module")
def translate_export(tiny_seq2seq, toy_translation: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A tiny Marian translate run, exported (encoder, decoder, decoder with past) with its
    int8 graphs."""
    folder = tmp_path_factory.mktemp("translate-export")
    run = tiny_run("translate", tiny_seq2seq("marian"), toy_translation, folder / "run",
                   **{"data.source_lang": "en", "data.target_lang": "es"})
    return run, folder / "onnx", export(run, folder / "onnx", quantize="int8")


@pytest.mark.slow  # the tiny Marian's three graphs take torch.onnx 30-70 s to trace
def test_translate_export_answers_as_pytorch(translate_export: tuple[Path, Path, dict]) -> None:
    _, out, report = translate_export
    graphs = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    assert report["files"][:3] == graphs and report["cache"] is True
    assert {*graphs, "generation_config.json", "config.json", "tokenizer.json", "README.md",
            "export.json"} <= {p.name for p in out.iterdir()}
    check = report["check"]
    assert check["largest_difference"] <= 1e-4 and check["rows"] == 12
    assert check["predictions_differ"] == 0 and check["metrics"] == check["onnx_metrics"]
    generations = report["generations"]
    assert generations["prompts"] == 12 and generations["differ"] == 0
    q = report["quantized"]  # BLEU of the int8 graphs beside the fp32 ones'
    assert q["files"] == [g.replace(".onnx", ".int8.onnx") for g in graphs]
    assert {"bleu", "chrf", "perplexity"} <= set(q["metrics"]) & set(q["fp32_metrics"])
    assert q["size_mb"] < q["fp32_size_mb"] and "generations" in q
    readme = (out / "README.md").read_text()
    assert "decoder_with_past_model.onnx" in readme and "key/value cache" in readme


@pytest.mark.slow  # the tiny Marian's three graphs take torch.onnx 30-70 s to trace
def test_generate_predict_and_eval_on_a_translate_export_answer_as_the_run(
        translate_export: tuple[Path, Path, dict], toy_translation: dict[str, Path],
        tmp_path: Path) -> None:
    from llmkit.inference.generate import load_prompts
    from llmkit.inference.ort import OrtSeq2SeqLM

    run, out, report = translate_export
    assert isinstance(load_prompts(str(out), [])[0], OrtSeq2SeqLM)  # not the run's weights
    prompts = tmp_path / "prompts.txt"
    rows = records(toy_translation["validation"])
    prompts.write_text("\n".join(r["translation"]["en"] for r in rows[:6]) + "\n")
    for name, options in {"greedy": ("--max-new-tokens", 12),
                          "beams": ("--num-beams", 3, "--num-return-sequences", 2,
                                    "--max-new-tokens", 8)}.items():
        for model in (run, out):
            done = llmkit("generate", "--model", model, "--input", prompts, "--output",
                          tmp_path / f"{name}-{model.name}.jsonl", *options)
            assert done.exit_code == 0, done.output
        assert records(tmp_path / f"{name}-onnx.jsonl") == records(tmp_path / f"{name}-run.jsonl")
    for model in (run, out):
        done = llmkit("predict", "--model", model, "--input", toy_translation["validation"],
                      "--output", tmp_path / f"{model.name}.jsonl")
        assert done.exit_code == 0, done.output
    assert records(tmp_path / "onnx.jsonl") == records(tmp_path / "run.jsonl")
    metrics = ("-m", "bleu", "-m", "perplexity", "--data", toy_translation["validation"])
    found = scores("--model", out, *metrics)
    assert found == pytest.approx(scores("--model", run, *metrics), rel=1e-5)
    assert found["bleu"] == pytest.approx(report["check"]["onnx_metrics"]["bleu"], abs=1e-6)
    done = llmkit("generate", "--model", out / "decoder_model.int8.onnx", "--prompt", "the cat")
    assert done.exit_code == 0, done.output


@pytest.mark.slow  # the tiny Marian's three graphs take torch.onnx 30-70 s to trace
def test_a_translate_export_without_its_cache_still_answers(
        translate_export: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """The export torch.onnx makes when it cannot trace the decoder with past: the whole
    sequence runs at every step, with the same generations; a folder missing its decoder
    is one line."""
    run, out, _ = translate_export
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("decoder_with_past*"))
    options = ("--prompt", "the cat eats", "--max-new-tokens", 10, "--num-beams", 2)
    expected, found = llmkit("generate", "--model", run, *options), llmkit(
        "generate", "--model", bare, *options)
    assert found.exit_code == 0 and found.stdout == expected.stdout, found.output
    (bare / "decoder_model.onnx").unlink()
    broken = llmkit("generate", "--model", bare, *options)
    assert broken.exit_code == 1 and "is a seq2seq export without its decoder_model.onnx" \
        in str(broken.exception)


def test_a_decoder_torch_onnx_cannot_cache_is_exported_without(
        tiny_seq2seq, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When torch.onnx fails on the decoder with past key values, the export goes on with the
    encoder and the whole-sequence decoder, and says so; the model gets its attention back."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llmkit.export import seq2seq

    def fake_export(module, model, args, kwargs, outputs, dynamic, path, opset, inputs=None):
        if path.name == "decoder_with_past_model.onnx":
            raise LlmkitError("torch.onnx cannot export MarianMTModel (marian) at opset 18: ...")
        path.write_bytes(b"")

    monkeypatch.setattr(seq2seq, "export_module", fake_export)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq("marian")).eval()
    attention = model.config._attn_implementation
    report = seq2seq.export_seq2seq(model, AutoTokenizer.from_pretrained(tiny_seq2seq("marian")),
                                    tmp_path, 18)
    assert report["files"] == ["encoder_model.onnx", "decoder_model.onnx"]
    assert report["cache"] is False and "no key/value cache" in report["notes"][0]
    assert model.config._attn_implementation == attention


def test_a_chat_run_s_export_is_checked_on_its_conversations_prompts() -> None:
    """A generate run on conversations: the greedy check's prompts are the turns before the
    first assistant turn in the chat template, ending with the generation prompt."""
    from llmkit.export.generation import PROMPT_TOKENS, conversation_prompts
    from tests.conftest import bpe_tokenizer

    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    talks = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
              {"role": "assistant", "content": "sat on the mat"}],
             [{"role": "assistant", "content": "no user turn"}],
             [{"role": "user", "content": " ".join(["the dog"] * 40)}]]
    assert conversation_prompts(talks, tokenizer, 8) == []  # no template: nothing to render
    tokenizer.chat_template = CHATML
    first, long = conversation_prompts(talks, tokenizer, 8)
    assert tokenizer.decode(first).endswith(
        "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n")  # no reply in it
    assert len(long) == PROMPT_TOKENS and tokenizer.decode(long).endswith("assistant\n")
    assert conversation_prompts(talks, tokenizer, 1) == [first]
