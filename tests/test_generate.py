"""Causal LM fine-tuning (packing, boundary masks, prompt/completion, perplexity) and
`llmkit generate` on a tiny random GPT-2."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.inference.generate import GenerationSettings, generate, read_prompts
from llmkit.models import load_generator
from llmkit.run.finetune import finetune
from llmkit.tasks import get_task, load_config
from llmkit.tasks.causal_lm import CausalData, block_size, collator, featurize, pack
from tests.conftest import count_calls, save_tiny_bert, two_ranks_and_one

runner = CliRunner()
TEXT = """the quick brown fox jumps over the lazy dog
what is the capital of france ? paris is the capital of france .

a gripping , funny and moving film
the plot is dull and the acting is worse

one of the best movies of the year
i loved every minute
"""


def test_pack_keeps_every_token_once_and_drops_only_the_tail() -> None:
    from datasets import Dataset

    docs = Dataset.from_dict({"ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]})
    packed = pack(docs, 4, eos=0, separate=True)
    assert packed["input_ids"] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert packed["labels"] == packed["input_ids"]  # the model shifts labels itself
    # positions restart at each document and at each block (a document cut by a block edge)
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    five = pack(docs, 5, eos=0, separate=False)
    assert [t for b in five["input_ids"] for t in b] == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8]
    assert "position_ids" not in five.column_names
    with pytest.raises(LlmkitError, match="fewer than one block of 64"):
        pack(docs, 64, eos=0, separate=False)


def test_separate_documents_keep_attention_inside_documents(tiny_gpt2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    a, b = (tokenizer(t)["input_ids"] for t in ("the quick brown fox", "great good bad"))
    from datasets import Dataset

    packed = pack(Dataset.from_dict({"ids": [a, b]}), len(a) + len(b) + 2,
                  tokenizer.eos_token_id, separate=True)
    batch = collator(tokenizer)([packed[0]])
    with torch.inference_mode():
        together = model(**batch).logits[0, len(a) + 1:]
        alone = model(input_ids=torch.tensor([[*b, tokenizer.eos_token_id]])).logits[0]
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_prompt_tokens_carry_no_loss(tiny_gpt2: Path) -> None:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    rows = Dataset.from_dict({"q": ["what is the capital of france ?"], "a": [" paris"]})
    cfg = CausalData(prompt_column="q", completion_column="a")
    [row] = featurize(rows, tokenizer, AutoConfig.from_pretrained(tiny_gpt2), cfg)
    prompt = len(tokenizer("what is the capital of france ?")["input_ids"])
    assert row["labels"][:prompt] == [-100] * prompt
    assert row["labels"][prompt:] == row["input_ids"][prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_eval_in_row_slices_equals_one_forward(tiny_gpt2: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation bounds the logits one forward holds (LOGITS_BUDGET) by slicing the rows;
    the per-example losses are those of one whole-batch forward, prompt masks included."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.randint(0, model.config.vocab_size, (5, 12),
                        generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :4] = -100  # a prompt
    labels[3, 9:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "use_cache": False}
    task = get_task("generate")
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    with torch.inference_mode():
        whole = task.eval_step(model, batch)
        monkeypatch.setattr("llmkit.tasks.task.LOGITS_BUDGET", 2 * 12 * model.config.vocab_size)
        sliced = task.eval_step(model, batch)
    assert seen == [5, 2, 2, 1]  # the whole batch, then slices of 2 rows within the budget
    assert sliced["loss_count"].tolist() == [11, 8, 11, 8, 11]  # token t+1 scored at t
    assert sliced["loss_count"].tolist() == whole["loss_count"].tolist()
    assert torch.allclose(sliced["loss_sum"], whole["loss_sum"], rtol=1e-5)


def test_block_size_is_clamped_with_both_numbers(tiny_gpt2: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A block size the user asked for is a warning; the default, a note."""
    from transformers import AutoConfig

    logger = logging.getLogger("llmkit")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="llmkit"):
            for asked in (1024, 2048):  # the default, then a size asked for
                config = AutoConfig.from_pretrained(tiny_gpt2)
                assert block_size(CausalData(block_size=asked), config) == 64
    finally:
        logger.removeHandler(caplog.handler)
    levels = {r.getMessage().split(" is")[0]: r.levelname for r in caplog.records
              if "more than the model's context" in r.getMessage()}
    assert levels == {"--block-size 1024": "INFO", "--block-size 2048": "WARNING"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text(TEXT * 6)
    (folder / "valid.txt").write_text(TEXT)
    return {"train": folder / "train.txt", "validation": folder / "valid.txt"}


def lm_config(model: Path, data: dict[str, Path], out: Path, **data_options: object):
    return load_config("generate", None, {
        "model": str(model), "output": str(out), "data.train": str(data["train"]),
        "data.validation": str(data["validation"]), "data.block_size": 16,
        "train.batch_size": 4, "train.learning_rate": 1e-3, "train.epochs": 2,
        **{f"data.{k}": v for k, v in data_options.items()}})


@pytest.fixture(scope="module")
def lm_run(tiny_gpt2: Path, corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Path:
    # long and fast enough that greedy decoding continues the text rather than printing spaces
    cfg = lm_config(tiny_gpt2, corpus, tmp_path_factory.mktemp("lm") / "run")
    return finetune(replace(cfg, train=replace(cfg.train, epochs=15, learning_rate=1e-2)))


def test_perplexity_is_exp_of_the_token_weighted_mean_loss(lm_run: Path, corpus: dict[str, Path]
                                                           ) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_run)
    paragraphs = [p for p in corpus["validation"].read_text().split("\n\n") if p.strip()]
    ids = [t for p in paragraphs for t in [*tokenizer(p)["input_ids"], tokenizer.eos_token_id]]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 15, 16):
            block = torch.tensor([ids[start:start + 16]])
            total += model(input_ids=block, labels=block).loss.item() * 15
            count += 15
    metrics = json.loads((lm_run / "metrics.json").read_text())
    assert metrics["final"]["eval_tokens"] == count
    assert metrics["final"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


PIPELINE = """
import sys
sys.modules["llmkit"] = None
from transformers import pipeline
out = pipeline("text-generation", model=sys.argv[1])("the quick", max_new_tokens=8,
                                                      do_sample=False, return_full_text=False)
print(out[0]["generated_text"])
"""


def test_run_loads_in_text_generation_pipeline_and_agrees(lm_run: Path) -> None:
    theirs = subprocess.run([sys.executable, "-c", PIPELINE, str(lm_run)], capture_output=True,
                            text=True, check=True).stdout.rstrip("\n")
    model, tokenizer = load_generator(str(lm_run))
    [ours] = generate(model, tokenizer, ["the quick"], GenerationSettings(max_new_tokens=8))
    assert ours["output"] == theirs


def test_an_empty_prompt_starts_from_bos_as_the_pipeline_does(lm_run: Path) -> None:
    """transformers' text-generation pipeline generates an empty prompt from the
    beginning-of-sequence token (generate() without input_ids): so do --prompt "" and an empty
    prompt in an --input file, alone or in a batch."""
    from transformers import pipeline

    theirs = pipeline("text-generation", model=str(lm_run))(
        "", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    model, tokenizer = load_generator(str(lm_run))
    settings = GenerationSettings(max_new_tokens=8)
    [alone] = generate(model, tokenizer, [""], settings)
    batched = generate(model, tokenizer, ["the", ""], settings, batch_size=2)
    assert alone["output"] == batched[1]["output"] == theirs and theirs.strip()
    assert alone["prompt_tokens"] == 1
    result = runner.invoke(app, ["generate", "-m", str(lm_run), "-p", "", "--max-new-tokens",
                                 "8"])
    assert result.exit_code == 0 and result.output == theirs + "\n", result.output


def test_an_empty_prompt_needs_a_bos_token() -> None:
    from types import SimpleNamespace

    from llmkit.inference.generate import start_empty

    def model(bos: int | None) -> SimpleNamespace:
        return SimpleNamespace(generation_config=SimpleNamespace(bos_token_id=bos))

    no_bos = SimpleNamespace(bos_token_id=None)
    assert start_empty([[5], []], model(7), no_bos) == [[5], [7]]
    assert start_empty([[5], []], model(None), SimpleNamespace(bos_token_id=3)) == [[5], [3]]
    with pytest.raises(LlmkitError, match="an empty prompt starts from the beginning-of-sequence"
                                          " token .* and this model has none"):
        start_empty([[5], []], model(None), no_bos)


def test_batched_greedy_equals_one_by_one(lm_run: Path) -> None:
    model, tokenizer = load_generator(str(lm_run))
    prompts = ["the", "what is the capital of", "one of the best movies of the"]
    settings = GenerationSettings(max_new_tokens=10)
    batched = generate(model, tokenizer, prompts, settings, batch_size=3)
    single = [generate(model, tokenizer, [p], settings)[0] for p in prompts]
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert batched[1]["output"].startswith(" france")  # it learned the text
    assert [r["prompt"] for r in batched] == prompts
    assert all(r["new_tokens"] <= 10 for r in batched)


def test_prompts_and_new_tokens_are_kept_inside_the_context(
        lm_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """64 positions: a 100-token prompt is cut from the left (its last tokens kept) and 100 new
    tokens stop at the end of the context, with warnings, instead of an IndexError."""
    model, tokenizer = load_generator(str(lm_run))
    long = " ".join(["the quick brown fox"] * 40)
    assert len(tokenizer(long)["input_ids"]) > 64
    records = generate(model, tokenizer, [long, "the"], GenerationSettings(max_new_tokens=100))
    assert records[0]["prompt_tokens"] == 63 and records[0]["new_tokens"] <= 1
    assert records[1]["prompt_tokens"] + records[1]["new_tokens"] <= 64
    assert "1 of 2 prompts are longer than the model's context of 64 tokens: cut at the " \
        "start" in caplog.text
    assert "--max-new-tokens 100 runs past the model's context of 64 tokens" in caplog.text


def test_seeded_sampling_repeats(lm_run: Path) -> None:
    model, tokenizer = load_generator(str(lm_run))
    settings = GenerationSettings(max_new_tokens=12, sample=True, temperature=1.5, seed=7,
                                  num_return_sequences=3)
    first = generate(model, tokenizer, ["the"], settings)
    assert first == generate(model, tokenizer, ["the"], settings)
    assert len(first[0]["output"]) == 3


def test_stream_prints_what_plain_generation_returns(lm_run: Path) -> None:
    args = ["generate", "-m", str(lm_run), "-p", "the quick", "--max-new-tokens", "12"]
    plain = runner.invoke(app, args)
    streamed = runner.invoke(app, [*args, "--stream"])
    assert plain.exit_code == streamed.exit_code == 0
    assert streamed.stdout == plain.stdout


def test_cpu_generation_uses_a_static_cache_with_the_same_outputs(lm_run: Path) -> None:
    model, tokenizer = load_generator(str(lm_run))
    model.to("cpu")  # a GPU keeps the default cache
    seen: list[dict] = []
    plain = model.generate

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return plain(*args, **kwargs)

    model.generate = recording
    prompts = ["the", "what is the capital of"]
    settings = GenerationSettings(max_new_tokens=8, num_beams=2)
    static = generate(model, tokenizer, prompts, settings)
    model.generation_config.cache_implementation = "dynamic"  # a checkpoint's own choice wins
    dynamic = generate(model, tokenizer, prompts, settings)
    assert [k.get("cache_implementation") for k in seen] == ["static", None]
    assert static == dynamic


def test_generate_does_not_import_datasets(lm_run: Path) -> None:
    """`llmkit generate` reads no dataset: datasets (with pandas, pyarrow) would cost it half a
    second and ~150 MB. (Where scikit-learn is installed, transformers imports it, and it pandas:
    not ours to avoid.)"""
    code = ("import sys; from typer.testing import CliRunner; from llmkit.cli import app; "
            "r = CliRunner().invoke(app, ['generate', '-m', sys.argv[1], '-p', 'the', "
            "'--max-new-tokens', '2']); assert r.exit_code == 0, r.output; "
            "heavy = {'datasets'} | ({'pandas', 'pyarrow'} if 'sklearn' not in sys.modules "
            "else set()); print(sorted(heavy & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, str(lm_run)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_batch_mode_writes_records(lm_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the"}\n{"prompt": "great"}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["generate", "-m", str(lm_run), "-i", str(prompts), "-o",
                                 str(out), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the", "great"]
    assert all({"output", "prompt_tokens", "new_tokens"} <= r.keys() for r in records)


def test_generation_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LlmkitError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(LlmkitError, match="bert encoder: it cannot generate text; it fits: "
                                          "classify"):
        load_generator(str(save_tiny_bert(tmp_path / "bert")))


def test_no_documents_after_splitting(tiny_gpt2: Path, tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n\n\n   \n")
    data = {"train": tmp_path / "blank.txt", "validation": tmp_path / "blank.txt"}
    with pytest.raises(LlmkitError, match="no documents"):
        finetune(lm_config(tiny_gpt2, data, tmp_path / "o", sample_by="line"))


def test_prompt_completion_finetune(tiny_gpt2: Path, tmp_path: Path) -> None:
    rows = [{"q": f"question {i} ?", "a": f" answer {i % 3}"} for i in range(24)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": tmp_path / "qa.jsonl", "validation": tmp_path / "qa.jsonl"}
    out = finetune(lm_config(tiny_gpt2, data, tmp_path / "pc", prompt_column="q",
                             completion_column="a"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["eval_samples"] == 24 and math.isfinite(metrics["final"]["perplexity"])


@pytest.mark.slow  # test_chat's 2-process run holds the same task across processes
def test_two_process_language_model_run(tiny_gpt2: Path, corpus: dict[str, Path],
                                        tmp_path: Path) -> None:
    args = ["finetune", "generate", "--model", str(tiny_gpt2), "--train", str(corpus["train"]),
            "--validation", str(corpus["validation"]), "--block-size", "16", "--batch-size", "4",
            "--epochs", "1", "--separate-documents"]
    m2, m1 = two_ranks_and_one(args, tmp_path)
    assert m2["final"]["eval_tokens"] == m1["final"]["eval_tokens"]
    assert m2["final"]["step"] == m1["final"]["step"]
    assert m2["final"]["perplexity"] == pytest.approx(m1["final"]["perplexity"], rel=1e-3)


def test_chat_template(tiny_gpt2: Path) -> None:
    from transformers import AutoTokenizer

    from llmkit.inference.generate import templated as chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    with pytest.raises(LlmkitError, match="no chat template"):
        chat(tokenizer, "hi")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat(tokenizer, "hi") == "<user>hi<assistant>"


def test_language_model_resumes_to_the_same_weights(tiny_gpt2: Path, corpus: dict[str, Path],
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 ties lm_head to the embeddings: checkpoints store the tensor once; resuming and
    keeping the best checkpoint must still restore both."""
    from safetensors.torch import load_file

    from llmkit.run import checkpoint

    def cfg(name: str):
        base = lm_config(tiny_gpt2, corpus, tmp_path / name)
        return replace(base, train=replace(base.train, save_steps=4, epochs=2))

    steady = finetune(cfg("steady"))
    save = checkpoint.save_checkpoint

    def save_then_die(accelerator, out, state):
        path = save(accelerator, out, state)
        if state.global_step == 8:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg("cut"))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    finetune(cfg("cut"), resume=True)
    a, b = (load_file(d / "model.safetensors") for d in (steady, tmp_path / "cut"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_perplexity_of_a_run(lm_run: Path, corpus: dict[str, Path]) -> None:
    result = runner.invoke(app, ["eval", "-m", "perplexity", "-m", "eval_tokens", "--model",
                                 str(lm_run), "--data", str(corpus["validation"]), "--json"])
    assert result.exit_code == 0, result.output
    scores = {s["metric"]: s["value"] for s in json.loads(result.stdout)["scores"]}
    final = json.loads((lm_run / "metrics.json").read_text())["final"]
    assert scores["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    assert scores["eval_tokens"] == final["eval_tokens"]


def test_tanh_gelus_train_as_one_kernel_with_the_same_outputs(tiny_gpt2: Path) -> None:
    """GPT-2's gelu_new runs as PyTorch's fused tanh GELU in llmkit's model; the function, the
    outputs (to float rounding) and the saved config stay the same."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2CLS

    from llmkit.models import load_model
    from llmkit.tasks import get_task

    cfg = load_config("generate", None, {"model": str(tiny_gpt2), "data.train": "x.txt",
                                         "output": "unused"})
    model, _ = load_model(get_task("generate"), cfg.model, cfg.data)
    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    kinds = {type(m) for m in model.modules()}
    assert ACT2CLS["gelu_new"] in {type(m) for m in plain.modules()}
    assert ACT2CLS["gelu_new"] not in kinds and ACT2CLS["gelu_pytorch_tanh"] in kinds
    assert model.config.activation_function == "gelu_new"
    ids = torch.randint(0, model.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, plain(ids).logits, atol=1e-5)


def test_tokenized_text_is_cached_and_workers_give_the_same_blocks(
        tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from llmkit.data.features import workers
    from llmkit.data.read import load_split
    from llmkit.tasks import get_task, load_config

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"document {i} says {'more ' * (i % 7)}\n\n" for i in range(400)))
    tokenizer, config = AutoTokenizer.from_pretrained(tiny_gpt2), AutoConfig.from_pretrained(
        tiny_gpt2)
    featurize = get_task("generate").featurize
    calls = count_calls(type(tokenizer), monkeypatch)
    found = []
    for count in (1, 1, 2):
        before = len(calls)
        cfg = load_config("generate", None, {
            "model": str(tiny_gpt2), "output": str(tmp_path / "o"), "data.train": str(text),
            "data.block_size": 32, "data.preprocessing_workers": count}).data
        assert workers(cfg) == (None if count == 1 else 2)
        found.append(featurize(load_split(str(text), "train", None, "--train", "paragraph"),
                               tokenizer, config, cfg))
        if count == 1 and before:
            assert len(calls) == before  # the rerun read datasets' cache file
    assert calls
    assert found[0]["input_ids"] == found[1]["input_ids"] == found[2]["input_ids"]


def lm_eval_rolling(tokens: list[int], prefix: int, length: int) -> list[tuple[list, list]]:
    """lm-evaluation-harness's get_rolling_token_windows with context_len=1, restated."""
    windows = [([prefix, *tokens[:length - 1]], tokens[:length])]
    predicted = min(length, len(tokens))
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, length)
        end = predicted + count
        windows.append((tokens[max(0, end - length - 1):end - 1], tokens[end - count:end]))
        predicted += count
    return windows


def test_rolling_perplexity_equals_lm_eval_and_a_token_by_token_loop(
        lm_run: Path, corpus: dict[str, Path]) -> None:
    """-m rolling_perplexity, word_perplexity, ... (stride = the block) score documents as
    lm-evaluation-harness's loglikelihood_rolling does; --stride 1 gives every token its full
    window of context."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_run)
    docs = [p for p in corpus["validation"].read_text().split("\n\n") if p.strip()]
    eos = tokenizer.eos_token_id  # the tiny tokenizer has no BOS: EOS is the prefix

    def logprob(context: list[int], targets: list[int]) -> float:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([context])).logits[0, -len(targets):]
        return float(torch.log_softmax(logits.double(), -1)[range(len(targets)), targets].sum())

    rolling = by_token = 0.0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        rolling += sum(logprob(c, t) for c, t in lm_eval_rolling(ids, eos, 16))
        full = [eos, *ids]
        by_token += sum(logprob(full[max(0, e - 16):e], [full[e]]) for e in range(1, len(full)))
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    size = sum(len(d.encode()) for d in docs)
    base = ["eval", "--model", str(lm_run), "--data", str(corpus["validation"]), "--json"]
    result = runner.invoke(app, [*base, "-m", "rolling_perplexity", "-m", "word_perplexity",
                                 "-m", "byte_perplexity", "-m", "bits_per_byte"])
    assert result.exit_code == 0, result.output
    found = {s["metric"]: s for s in json.loads(result.stdout)["scores"]}
    scores = {name: s["value"] for name, s in found.items()}
    assert scores["word_perplexity"] == pytest.approx(math.exp(-rolling / words), rel=1e-5)
    assert scores["byte_perplexity"] == pytest.approx(math.exp(-rolling / size), rel=1e-5)
    assert scores["bits_per_byte"] == pytest.approx(-rolling / size / math.log(2), rel=1e-5)
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert found["rolling_perplexity"]["details"]["tokens"] == tokens
    assert scores["rolling_perplexity"] == pytest.approx(math.exp(-rolling / tokens), rel=1e-5)
    result = runner.invoke(app, [*base, "-m", "rolling_perplexity", "--stride", "1"])
    scores = {s["metric"]: s["value"] for s in json.loads(result.stdout)["scores"]}
    assert scores["rolling_perplexity"] == pytest.approx(math.exp(-by_token / tokens), rel=1e-5)
    too_long = runner.invoke(app, [*base, "-m", "rolling_perplexity", "--stride", "17"])
    assert too_long.exit_code == 1 and "longer than the window (16 tokens" in str(
        too_long.exception)


def test_from_scratch_with_config_overrides_and_another_tokenizer(
        tiny_gpt2: Path, corpus: dict[str, Path], tmp_path: Path) -> None:
    """run_clm.py's --config_overrides and training from a config without its weights, and
    --tokenizer: a larger vocabulary grows the embeddings; the run loads in plain transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import bpe_tokenizer

    tokenizer = bpe_tokenizer(vocab_size=340)
    tokenizer.save_pretrained(tmp_path / "tok")
    base = ["finetune", "generate", "--model", str(tiny_gpt2), "--train", str(corpus["train"]),
            "--validation", str(corpus["validation"]), "--block-size", "16", "--epochs", "1"]
    result = runner.invoke(app, [*base, "--output", str(tmp_path / "new"), "--from-scratch",
                                 "--config-overrides", "n_layer=1,n_embd=16,resid_pdrop=0.0",
                                 "--tokenizer", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    assert (model.config.n_layer, model.config.n_embd, model.config.resid_pdrop) == (1, 16, 0.0)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(
        AutoTokenizer.from_pretrained(tmp_path / "new"))
    card = (tmp_path / "new" / "README.md").read_text()
    assert "A new model of" in card and "n_layer=1,n_embd=16" in card
    # pretrained weights with a shape-keeping override: loaded as they were, dropout changed
    result = runner.invoke(app, [*base, "--output", str(tmp_path / "tuned"), "--lr", "0",
                                 "--config-overrides", "resid_pdrop=0.0"])
    assert result.exit_code == 0, result.output
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    start = load_file(tiny_gpt2 / "model.safetensors")
    torch.testing.assert_close(tuned["transformer.h.0.mlp.c_fc.weight"],
                               start["transformer.h.0.mlp.c_fc.weight"])
    for overrides, message in (
            ("n_embd=16", "changes the shape of pretrained weights (transformer.h.0.attn"),
            ("n_layers=1", "key n_layers isn't in the original config dict"),
            ("n_layer", "expected key=value pairs separated by commas"),
            ("n_layer=one", "invalid literal for int()")):
        refused = runner.invoke(app, [*base, "--output", str(tmp_path / "x"),
                                      "--config-overrides", overrides])
        assert refused.exit_code == 1 and message in str(refused.exception), overrides


def test_new_tokens_end_at_the_first_end_token_and_leave_padding_out() -> None:
    """Token counts (usage, tokens/s): up to and including the first end of sequence or of turn;
    a row stopped by a stop string is followed by padding that was not generated; a decoder's
    start token (the pad of Marian and T5) is not new."""
    from types import SimpleNamespace

    from llmkit.inference.generate import new_token_count

    own_pad = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    assert new_token_count([5, 6, 2, 0, 0], own_pad) == 3
    assert new_token_count([5, 6, 7, 0, 0], own_pad) == 3  # a stop string, then padding
    assert new_token_count([5, 6, 7], own_pad) == 3
    assert new_token_count([0, 5, 6, 2, 0], own_pad) == 3  # after the decoder's start
    assert new_token_count([5, 9, 0, 0], own_pad, [2, 9]) == 2  # 9: the end of a turn
    assert new_token_count([5, 9, 0, 0], own_pad, 2) == 2
    eos_pad = SimpleNamespace(pad_token_id=2, eos_token_id=2)
    assert new_token_count([5, 6, 2, 2, 2], eos_pad) == 3
    assert new_token_count([5, 9, 2, 2], eos_pad, [2, 9]) == 2
