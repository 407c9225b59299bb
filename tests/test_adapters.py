"""LoRA adapters (peft) in the one loop: adapter-only run directories and checkpoints, exact
resume, merge into a model plain transformers loads, every task, many processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmkit.inference.predict import merge, predict
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from tests.conftest import cut_after_checkpoint
from tests.test_classify import config


def lora(model: Path, data: dict[str, Path], out: Path, **train: object):
    cfg = config(model, data, out, learning_rate=1e-2, **train)
    return load_config("classify", {**{"adapter": {"lora": True, "lora_r": 4}},
                                    "model": cfg.model, "output": cfg.output,
                                    "data": {"train": cfg.data.train,
                                             "validation": cfg.data.validation},
                                    "train": {k: getattr(cfg.train, k) for k in
                                              ("batch_size", "learning_rate", "epochs",
                                               *train)}})


@pytest.fixture(scope="module")
def adapter_run(tiny_bert: Path, toy: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune(lora(tiny_bert, toy, tmp_path_factory.mktemp("lora") / "run"))


def test_an_adapter_run_holds_the_adapter_and_trained_it(adapter_run: Path) -> None:
    from safetensors.torch import load_file

    names = {p.name for p in adapter_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json",
            "config.yaml", "metrics.json"} <= names
    assert "model.safetensors" not in names  # the frozen base is not copied
    metrics = json.loads((adapter_run / "metrics.json").read_text())
    run = metrics["run"]
    assert 0 < run["trainable_parameters"] < run["total_parameters"] / 2
    weights = load_file(adapter_run / "adapter_model.safetensors")
    ups = [t for name, t in weights.items() if "lora_B" in name]  # peft starts them at zero
    assert len(ups) == 13 and all(float(t.abs().sum()) > 0 for t in ups)
    assert any("classifier" in name for name in weights)  # the new head, trained in full
    adapter = json.loads((adapter_run / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["modules_to_save"] == ["classifier", "score"]


def card_code(folder: Path) -> str:
    """The Python block of a model card's "Use" section."""
    text = (folder / "README.md").read_text(encoding="utf-8").split("## Use", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def run_code(code: str, cwd: Path, *blocked: str) -> str:
    """`code` run as written by a fresh Python without llmkit (nor `blocked`); its output."""
    script = "".join(f"import sys; sys.modules[{name!r}] = None\n"
                     for name in ("llmkit", *blocked)) + code
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_merged_model_answers_as_the_adapter_run_without_peft(
        adapter_run: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    """`llmkit merge` writes a full model with a card and manifest; the card's code (as written,
    then on five rows) loads it without peft, answering as the adapter run does."""
    from huggingface_hub import ModelCard

    from llmkit.run.card import merged as merge_described

    merged = merge_described(adapter_run, tmp_path / "merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md",
            "manifest.json"} <= {p.name for p in merged.iterdir()}
    card = ModelCard.load(merged / "README.md").data
    assert card.library_name == "transformers" and "merged" in card.tags
    made = json.loads((merged / "manifest.json").read_text())
    assert made["merged"]["from"] == str(adapter_run)
    assert made["merged"]["commands"][0].startswith("llmkit merge ")
    ours = predict(str(adapter_run), str(toy["validation"]))
    assert ours == predict(str(merged), str(toy["validation"]))
    texts = [r["text"] for r in ours[:5]]
    out = run_code(card_code(merged) + f"import json; print(json.dumps(run({texts!r})))",
                   tmp_path, "peft")
    plain = json.loads(out.strip().splitlines()[-1])
    assert [r["label"] for r in plain] == [r["label"] for r in ours[:5]]
    assert [r["score"] for r in plain] == pytest.approx([r["score"] for r in ours[:5]], abs=1e-5)


def test_the_card_s_code_loads_an_adapter_run_as_written(adapter_run: Path, tiny_bert: Path,
                                                         tmp_path: Path) -> None:
    """The card's "Use" code of a LoRA classify run runs as written in plain transformers and
    peft (from another folder: the run's path is the one it was given) and answers as
    `llmkit predict`; its metadata names the base by its folder's name, not its full path."""
    import re

    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter_run / "README.md").data
    assert card.library_name == "peft" and card.base_model == tiny_bert.name
    assert card.license == "unknown" and "lora" in card.tags and card.language is None
    code = card_code(adapter_run)
    assert f"path = {str(adapter_run)!r}" in code and "AutoPeftModelFor" in code
    (tmp_path / "one.tsv").write_text("text\nA sentence to classify.\n")
    [ours] = predict(str(adapter_run), str(tmp_path / "one.tsv"))
    printed = run_code(code, tmp_path).strip().splitlines()[-1]
    label, score = re.search(r"'label': '([^']*)', 'score': [^\d]*([\d.e-]+)", printed).groups()
    assert label == ours["label"] and float(score) == pytest.approx(ours["score"], abs=1e-5)


def test_peft_auto_class_loads_a_three_label_adapter_run_with_its_labels(
        tiny_bert: Path, tmp_path: Path) -> None:
    """peft's AutoPeftModel builds the base with the base's own labels (2): the run's
    config.json supplies the label count and names, as the README shows."""
    import random

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    rng = random.Random(0)
    colours = {"red": "warm", "blue": "cold", "green": "calm"}
    rows = [f"{c} {rng.choice(['day', 'sky'])}\t{colours[c]}"
            for c in rng.choices(list(colours), k=48)]
    data = tmp_path / "rows.tsv"
    data.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    run = finetune(lora(tiny_bert, {"train": data, "validation": data}, tmp_path / "run"))
    labels = AutoConfig.from_pretrained(run)
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        run, num_labels=labels.num_labels, id2label=labels.id2label, label2id=labels.label2id)
    tokenizer = AutoTokenizer.from_pretrained(run)
    texts = [r.split("\t")[0] for r in rows[:6]]
    with torch.inference_mode():
        ids = model.eval()(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    ours = predict(str(run), str(data))[:6]
    assert [model.config.id2label[int(i)] for i in ids.argmax(-1)] == [r["label"] for r in ours]
    assert sorted(model.config.id2label.values()) == ["calm", "cold", "warm"]


def test_a_qlora_run_is_predicted_and_merged_at_full_precision(
        adapter_run: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    # a run trained on a 4-bit base whose config still held the bitsandbytes settings (as
    # runs made before they were dropped on save): loading it must not quantize the base
    run = tmp_path / "qlora-run"
    shutil.copytree(adapter_run, run)
    config = json.loads((run / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (run / "config.json").write_text(json.dumps(config))
    assert predict(str(run), str(toy["validation"])) == predict(str(adapter_run),
                                                                 str(toy["validation"]))
    merged = merge(run, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in json.loads((adapter_run / "config.json").read_text())


@pytest.mark.parametrize(("base", "said"), [
    ("gpt2", "is a gpt2 model and the adapter of {run} was trained on a bert one"),
    ("wider", "does not fit the adapter of {run}, which was trained on a base of another shape "
              "(bert.embeddings"),
    ("shallower", "(bert.encoder.layer.1.attention.output.dense.weight, "),
    ("deeper", "(encoder.layer.2.attention.output.LayerNorm.bias, "),
    ("same", None)])
def test_merge_refuses_a_base_that_does_not_fit_the_adapter(
        base: str, said: str | None, adapter_run: Path, tiny_gpt2: Path, tmp_path: Path) -> None:
    """peft loads an adapter onto any base built from the run's config: the weights of a base
    of another kind, size or depth would be left random (or cut) without a word."""
    from transformers import BertConfig, BertModel

    from llmkit.errors import LlmkitError
    from tests.conftest import wordpiece_tokenizer

    folder = tiny_gpt2 if base == "gpt2" else tmp_path / base
    if base != "gpt2":
        sizes = {"wider": (64, 2), "shallower": (32, 1), "deeper": (32, 3), "same": (32, 2)}
        hidden, layers = sizes[base]
        tokenizer = wordpiece_tokenizer()
        torch.manual_seed(0)  # "same" is the tiny BERT the adapter was trained on, saved again
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                             num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128)
                  ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    if said is None:
        assert merge(adapter_run, tmp_path / "merged", str(folder)).is_dir()
        return
    with pytest.raises(LlmkitError, match=re.escape(said.format(run=adapter_run))):
        merge(adapter_run, tmp_path / "merged", str(folder))
    assert not (tmp_path / "merged").exists()


def test_an_interrupted_adapter_run_resumes_to_the_same_adapter(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    steady = finetune(lora(tiny_bert, toy, tmp_path / "steady", save_steps=5, epochs=2))
    cut = lora(tiny_bert, toy, tmp_path / "cut", save_steps=5, epochs=2)
    cut_after_checkpoint(cut, 10, monkeypatch)
    kept = tmp_path / "cut" / "checkpoints" / "checkpoint-10"
    files = {p.name for p in kept.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    finetune(cut, resume=True)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (steady, tmp_path / "cut"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(tiny_gpt2: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.config.schema import AdapterConfig
    from llmkit.run.adapters import wrap

    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
        if checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
        torch.manual_seed(0)
        peft_model = wrap(model, "generate", AdapterConfig(lora=True, lora_r=4, lora_dropout=0))
        peft_model.train()
        ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters()
                      if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_dropout_is_dropout_then_linear(autocast: bool) -> None:
    from llmkit.run.adapters import DropLinear

    x = torch.randn(3, 5, 7, requires_grad=True)  # 105 elements: the bits end mid-byte
    weight = torch.randn(4, 7, requires_grad=True)
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if lean:
                out = DropLinear.apply(x, weight, 0.3)
            else:
                keep = torch.rand(x.shape) >= 0.3
                out = torch.nn.functional.linear(x * keep / 0.7, weight)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, weight.grad))
        x.grad = weight.grad = None
    for reference, lean in zip(*results, strict=True):
        assert lean.dtype == reference.dtype
        torch.testing.assert_close(lean, reference)
    dropped = DropLinear.apply(torch.ones(20000, 1), torch.ones(1, 1), 0.3) == 0
    assert 0.28 < dropped.float().mean() < 0.32


def test_lean_dropout_keeps_less_for_backward_and_peft_s_keys(tiny_bert: Path) -> None:
    import copy

    from transformers import AutoModelForSequenceClassification

    from llmkit.config.schema import AdapterConfig
    from llmkit.run.adapters import lean_dropout, wrap

    model = wrap(AutoModelForSequenceClassification.from_pretrained(tiny_bert), "classify",
                 AdapterConfig(lora=True, lora_r=4, lora_dropout=0.1))
    lean = copy.deepcopy(model)
    lean_dropout(lean)
    assert lean.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(5, 90, (4, 16))
    kept = []
    for m in (model, lean):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        m.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids).logits.sum().backward()
        kept.append(sum(storages.values()))
        m.eval()
    assert kept[1] < 0.9 * kept[0]
    torch.testing.assert_close(lean(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("task", ["qa", "translate", "generate"])
def test_every_task_trains_an_adapter(task: str, tiny_bert: Path, tiny_gpt2: Path,
                                      tiny_seq2seq, toy_translation: dict[str, Path],
                                      tmp_path: Path) -> None:
    from llmkit.inference.predict import run_config

    data = tmp_path / "rows.jsonl"
    if task == "qa":
        rows = [{"id": str(i), "question": "who did it?", "context": f"ann did it {i} times",
                 "answers": {"text": ["ann"], "answer_start": [0]}} for i in range(24)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        model, extra = tiny_bert, {}
    elif task == "translate":
        data, model = toy_translation["train"], tiny_seq2seq("marian")
        extra = {"source_lang": "en", "target_lang": "es"}
    else:
        data.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the dog"})
                                + "\n" for _ in range(40)))
        model, extra = tiny_gpt2, {"block_size": 16}
    cfg = load_config(task, {"model": str(model), "output": str(tmp_path / "run"),
                             "data": {"train": str(data), **extra},
                             "train": {"epochs": 1, "batch_size": 8},
                             "adapter": {"lora": True, "lora_r": 2}})
    out = finetune(cfg)
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert run_config(str(out)).adapter.lora
    merged = merge(out, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


def test_two_processes_train_the_same_adapter_as_one(tmp_path: Path,
                                                     toy: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from tests.conftest import save_tiny_bert, two_ranks_and_one

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)  # dropout draws differ per rank
    common = ["finetune", "classify", "--model", str(model), "--train", str(toy["train"]),
              "--validation", str(toy["validation"]), "--batch-size", "8", "--epochs", "2",
              "--lr", "1e-2", "--lora", "--lora-r", "4", "--lora-dropout", "0"]
    m2, m1 = two_ranks_and_one(common, tmp_path)
    assert m2["run"]["trainable_parameters"] == m1["run"]["trainable_parameters"]
    for a, b in zip(m2["history"], m1["history"], strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    w2, w1 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("two", "one"))
    assert w2.keys() == w1.keys()
    for key in w1:
        assert w2[key].allclose(w1[key], rtol=1e-4, atol=1e-5), key


def test_a_lora_run_trains_as_trainer_and_peft_on_the_same_batches(toy: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """Dropout off, length grouping off, and Trainer + peft (all-linear, SEQ_CLS) given llmkit's
    batches in llmkit's order: after an epoch of 12 steps (linear schedule, AdamW's decay groups,
    clipping) both hold the same adapter and the same head."""
    from datasets import load_dataset
    from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from llmkit.data.batches import LengthGroupedBatches
    from llmkit.data.features import lengths
    from llmkit.tasks import get_task
    from tests.conftest import save_tiny_bert

    base = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    torch.manual_seed(1)  # the head both start from, saved with llmkit's labels
    AutoModelForSequenceClassification.from_pretrained(
        base, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}
    ).save_pretrained(base)
    cfg = lora(base, toy, tmp_path / "run", epochs=1, weight_decay=0.01, seed=3,
               group_by_length=False)
    cfg = replace(cfg, adapter=replace(cfg.adapter, lora_dropout=0.0))
    finetune(cfg)
    net = AutoModelForSequenceClassification.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train = get_task("classify").featurize(load_dataset("csv", data_files=str(toy["train"]),
                                                        delimiter="\t", split="train"),
                                           tokenizer, net.config, cfg.data)
    batches = LengthGroupedBatches(lengths(train), 8, seed=3, group=False)
    batches.set_epoch(0)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: object, **kwargs: object) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    torch.manual_seed(3)  # the adapters' first weights as llmkit's (seed 3)
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0,
                                         target_modules="all-linear",
                                         task_type=TaskType.SEQ_CLS))
    InOrder(model=net, train_dataset=train.select([i for batch in batches for i in batch]),
            data_collator=DataCollatorWithPadding(tokenizer), args=TrainingArguments(
                output_dir=str(tmp_path / "trainer"), num_train_epochs=1, learning_rate=1e-2,
                per_device_train_batch_size=8, weight_decay=0.01, save_strategy="no",
                report_to=[], disable_tqdm=True)).train()
    ours = load_file(tmp_path / "run" / "adapter_model.safetensors")
    theirs = get_peft_model_state_dict(net)
    assert ours.keys() == theirs.keys() and any("classifier" in k for k in ours)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=1e-5, msg=key)
