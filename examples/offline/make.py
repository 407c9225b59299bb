"""Tiny random checkpoints and data to try llmkit's generation tasks with no download.

    python examples/offline/make.py                 # models/ and data/ beside this file
    python examples/offline/make.py --out DIR       # somewhere else

Writes, in a few seconds on a CPU:
  data/generate/{train,validation}.txt     short sentences of a toy grammar, in paragraphs
  data/chat/{train,validation}.jsonl       conversations ({"messages": [...]}): capitals
  data/translate/{train,validation}.jsonl  {"translation": {"en": ..., "es": ...}} pairs
  data/summarize/{train,validation}.jsonl  {"text": ..., "summary": ...}: the lead sentence
  models/gpt2/     a 2-layer GPT-2 whose tokenizer has ChatML's markers and template
  models/t5/       a 2-layer T5 (English to toy Spanish)
  models/bart/     a 2-layer BART
Each model is random (nothing pretrained) with a tokenizer trained on the data above, saved by
save_pretrained like any Hub checkpoint. The data is the same on every run (seeded): the copy
in data/ is this script's output. examples/README.md has the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SUBJECTS = ["the cat", "the dog", "a bird", "the old man", "a child", "the farmer", "my sister"]
VERBS = ["sees", "likes", "eats", "finds", "follows", "paints", "carries"]
OBJECTS = ["the ball", "some bread", "a red apple", "the small boat", "a green leaf",
           "the blue cup", "an old book"]
PLACES = ["in the garden", "by the river", "at home", "on the hill", "near the market",
          "under the tree"]
CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin",
            "greece": "athens", "norway": "oslo", "egypt": "cairo", "japan": "tokyo",
            "peru": "lima", "kenya": "nairobi"}
EN_ES = {"the": "el", "a": "un", "dog": "perro", "cat": "gato", "man": "hombre",
         "boy": "chico", "horse": "caballo", "bird": "pájaro", "sees": "ve", "eats": "come",
         "likes": "quiere", "has": "tiene", "bread": "pan", "fish": "pescado", "ball": "balón",
         "book": "libro", "big": "grande", "small": "pequeño", "old": "viejo", "red": "rojo",
         "good": "bueno", "and": "y", "today": "hoy", "now": "ahora"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = {"train": 400, "validation": 40}


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(PLACES)} .")


def corpus(rng: random.Random, rows: int) -> str:
    """Sentences, four to a paragraph (finetune generate reads a paragraph as a document)."""
    lines = [sentence(rng) for _ in range(rows)]
    return "\n\n".join("\n".join(lines[i:i + 4]) for i in range(0, rows, 4)) + "\n"


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """A greeting, or one or two questions about capitals, and the answers."""
    turns: list[dict[str, str]] = []
    if rng.random() < 0.2:
        turns += [{"role": "user", "content": rng.choice(["hello", "hi", "hello there"])},
                  {"role": "assistant", "content": "hello ! ask me about a capital ."}]
    for country in rng.sample(sorted(CAPITALS), rng.choice([1, 1, 2])):
        turns += [{"role": "user", "content": f"what is the capital of {country} ?"},
                  {"role": "assistant",
                   "content": f"the capital of {country} is {CAPITALS[country]} ."}]
    return turns


def pair(rng: random.Random) -> dict[str, dict[str, str]]:
    """'the big dog eats the bread today' and its word-by-word toy Spanish."""
    nouns, adjectives = ["dog", "cat", "man", "boy", "horse", "bird", "bread", "fish", "ball",
                         "book"], ["big", "small", "old", "red", "good"]
    words = [rng.choice(["the", "a"]), *rng.sample(adjectives, rng.choice([0, 1])),
             rng.choice(nouns[:6]), rng.choice(["sees", "eats", "likes", "has"]),
             rng.choice(["the", "a"]), rng.choice(nouns)]
    words += [rng.choice(["today", "now"])] if rng.random() < 0.3 else []
    return {"translation": {"en": " ".join(words), "es": " ".join(EN_ES[w] for w in words)}}


def document(rng: random.Random) -> dict[str, str]:
    """Three to five sentences; the summary is the first."""
    sentences = [sentence(rng) for _ in range(rng.randint(3, 5))]
    return {"text": " ".join(sentences), "summary": sentences[0]}


def write_data(folder: Path) -> None:
    for split, rows in SIZES.items():
        rng = random.Random(f"{split}-0")  # the same files on every run
        files = {"generate": (f"{split}.txt", corpus(rng, rows)),
                 "chat": (f"{split}.jsonl", lines({"messages": conversation(rng)}
                                                  for _ in range(rows // 2))),
                 "translate": (f"{split}.jsonl", lines(pair(rng) for _ in range(rows))),
                 "summarize": (f"{split}.jsonl", lines(document(rng)
                                                       for _ in range(rows * 3 // 4)))}
        for task, (name, text) in files.items():
            (folder / task).mkdir(parents=True, exist_ok=True)
            (folder / task / name).write_text(text, encoding="utf-8")


def lines(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def texts(folder: Path, task: str) -> list[str]:
    """Every text of a task's training file (what its tokenizer is trained on)."""
    path = next((folder / task).glob("train.*"))
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        found += ([m["content"] for m in record["messages"]] if "messages" in record
                  else list(record.get("translation", record).values()))
    return found


def gpt2(data: Path, out: Path) -> None:
    """GPT-2 with a byte-level BPE tokenizer, ChatML's markers and its template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(data, "generate") + texts(data, "chat"), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256)
    tokenizer.chat_template = CHATML
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2,
                               n_positions=256, bos_token_id=eos, eos_token_id=eos)
                    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def seq2seq(data: Path, task: str, family: str, out: Path) -> None:
    """A T5 or BART model with a Metaspace BPE tokenizer trained on the task's data."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    template = "$A </s>" if family == "t5" else "<s> $A </s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    prefix = ["translate English to Spanish:"] if family == "t5" else []  # llmkit adds it
    tok.train_from_iterator(texts(data, task) + prefix, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special
                                         if t in template])
    names = {"</s>": "eos_token", "<unk>": "unk_token", "<pad>": "pad_token", "<s>": "bos_token"}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=256, **{names[t]: t for t in special})
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "t5":
        config: Any = transformers.T5Config(
            vocab_size=len(tokenizer), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
            decoder_start_token_id=tokenizer.pad_token_id, **ids)
    else:
        config = transformers.BartConfig(
            vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id, **ids)
    torch.manual_seed(0)
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write data/ and models/ into (default: beside this "
                             "script)")
    parser.add_argument("--data-only", action="store_true", help="write data/ only")
    args = parser.parse_args()
    data, models = args.out / "data", args.out / "models"
    write_data(data)
    if not args.data_only:
        from transformers.utils import logging

        logging.disable_progress_bar()  # save_pretrained's, for files of a megabyte
        gpt2(data, models / "gpt2")
        seq2seq(data, "translate", "t5", models / "t5")
        seq2seq(data, "summarize", "bart", models / "bart")
    print(f"wrote {data}" + ("" if args.data_only else f" and {models}"))


if __name__ == "__main__":
    main()
