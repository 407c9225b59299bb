"""Shared fixtures: tiny random checkpoints saved to disk and loaded back through from_pretrained,
the same path users hit with a Hub id or a local folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CORPUS = [
    "a gripping , funny and moving film", "the plot is dull and the acting is worse",
    "an utter waste of time", "one of the best movies of the year", "i loved every minute",
    "boring , predictable and far too long", "the cast is wonderful", "a mess from start to end",
    "what is the capital of france ? paris is the capital of france .",
    "the quick brown fox jumps over the lazy dog", "great good bad awful fine poor superb",
]


def needs_shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the checkout)")
    return path


def wordpiece_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS * 3, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                  special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)


def save_tiny_bert(path: Path, dropout: float = 0.1) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT encoder (no task head) with its own WordPiece tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment() -> dict[str, Path]:
    """The sample data llmkit ships for its quick start."""
    folder = EXAMPLES / "sentiment"
    return {"train": folder / "train.tsv", "validation": folder / "dev.tsv"}


def write_toy_sentiment(path: Path, rows: int, seed: int) -> Path:
    """A TSV a tiny model can learn: words from its vocabulary, sentiment set by one word."""
    import random

    rng = random.Random(seed)
    fillers = ["the film is", "the cast is", "the plot is", "one of the best", "what a"]
    words = {"good": ["great", "good", "superb", "wonderful"], "bad": ["bad", "awful", "poor",
                                                                       "dull"]}
    lines = ["text\tlabel"]
    for i in range(rows):
        label = "good" if i % 2 else "bad"
        lines.append(f"{rng.choice(fillers)} {' '.join(rng.choices(fillers, k=rng.randint(0, 3)))}"
                     f" {rng.choice(words[label])}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy")
    return {"train": write_toy_sentiment(folder / "train.tsv", 96, 0),
            "validation": write_toy_sentiment(folder / "dev.tsv", 30, 1)}


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer like GPT-2's, with <|endoftext|> and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   model_max_length=64)


def save_tiny_gpt2(path: Path, positions: int = 64) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = bpe_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                        n_positions=positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 (64 positions) with its own byte-level BPE tokenizer."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def two_ranks_and_one(args: list[str], out: Path) -> tuple[dict, dict]:
    """Run `llmkit ARGS` as 2 torchrun ranks (out/two) and as 1 process with gradient
    accumulation 2 (out/one): the same global batches. Returns both metrics.json."""
    import json
    import os
    import subprocess
    import sys

    cpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # two ranks over gloo, GPUs or not
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "llmkit", *args, "--output", str(out / "two")],
                         capture_output=True, text=True, timeout=300, env=cpu)
    assert two.returncode == 0, two.stderr[-3000:]
    # the one process runs in this one: a process start (imports) less per test
    from llmkit.cli import main

    argv = sys.argv
    sys.argv = ["llmkit", *args, "--output", str(out / "one"), "--gradient-accumulation-steps",
                "2"]
    try:
        main()
    except SystemExit as stop:
        assert not stop.code, f"the one-process run failed: exit {stop.code}"
    finally:
        sys.argv = argv
    m2, m1 = (json.loads((out / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert m2["run"]["num_processes"] == 2 and m1["run"]["num_processes"] == 1
    return m2, m1


EN_ES = {"the": "el", "house": "casa", "is": "es", "small": "pequeña", "big": "grande",
         "dog": "perro", "cat": "gato", "sees": "ve", "a": "un", "red": "rojo", "old": "viejo",
         "man": "hombre", "eats": "come", "bread": "pan", "good": "bueno", "and": "y"}
SEQ2SEQ = {  # family -> (config class, special tokens in id order, template of one text)
    "marian": ("MarianConfig", ["</s>", "<unk>", "<pad>"], "$A </s>"),
    "t5": ("T5Config", ["<pad>", "</s>", "<unk>"], "$A </s>"),
    "bart": ("BartConfig", ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>"),
}


def toy_pairs(rows: int, seed: int) -> list[tuple[str, str]]:
    """English-like sentences and their word-by-word 'Spanish' (a tiny model can learn it)."""
    import random

    rng = random.Random(seed)
    words = list(EN_ES)
    pairs = []
    for _ in range(rows):
        sentence = rng.choices(words, k=rng.randint(3, 8))
        pairs.append((" ".join(sentence), " ".join(EN_ES[w] for w in sentence)))
    return pairs


def seq2seq_tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from tokenizers import decoders as tok_decoders
    from transformers import PreTrainedTokenizerFast

    _, special, template = SEQ2SEQ[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = tok_decoders.Metaspace()
    text = [f"{a} {b}" for a, b in toy_pairs(200, 0)] + CORPUS
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special
                                         if t in template])
    names = {"</s>": "eos_token", "<unk>": "unk_token", "<pad>": "pad_token", "<s>": "bos_token"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64,
                                   **{names[t]: t for t in special})


def save_tiny_seq2seq(path: Path, family: str, dropout: float = 0.1) -> Path:
    """A random 2-layer encoder-decoder of `family` (marian, t5, bart) with its own tokenizer."""
    import torch
    import transformers

    tokenizer = seq2seq_tokenizer(family)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "t5":
        config = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64,
                                       num_layers=2, num_heads=2, decoder_start_token_id=0,
                                       dropout_rate=dropout, **ids)
    else:
        start = tokenizer.pad_token_id if family == "marian" else tokenizer.eos_token_id
        config = getattr(transformers, SEQ2SEQ[family][0])(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=start,
            bos_token_id=tokenizer.bos_token_id, dropout=dropout, **ids)
    torch.manual_seed(0)
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory: pytest.TempPathFactory):
    """family -> folder of a random tiny Marian / T5 / BART, built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save_tiny_seq2seq(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def toy_translation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hub-layout translation rows ({"id", "translation": {"en", "es"}}) as JSON lines."""
    import json

    folder = tmp_path_factory.mktemp("toy-translation")
    files = {}
    for split, rows, seed in (("train", 64, 1), ("validation", 12, 2)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"id": i, "translation": {"en": en, "es": es}})
                                        + "\n" for i, (en, es) in
                                        enumerate(toy_pairs(rows, seed))), encoding="utf-8")
    return files


class Killed(Exception):
    """Stands for a process killed right after a checkpoint was written."""


def cut_after_checkpoint(cfg, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `cfg` until the checkpoint of `step` is on disk, then stop it as a kill would."""
    from llmkit.run import checkpoint
    from llmkit.run.finetune import finetune

    save = checkpoint.save_checkpoint

    def save_then_die(accelerator, out, state):
        path = save(accelerator, out, state)
        if state.global_step == step:
            raise Killed
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        finetune(cfg)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def count_calls(cls: type, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every call of instances of `cls` (a tokenizer class): tells
    whether a featurize read datasets' cache instead of tokenizing."""
    calls: list[int] = []
    original = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(1) or original(
        self, *a, **k))
    return calls
