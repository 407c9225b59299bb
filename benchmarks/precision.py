"""llmkit classify in fp32 and bf16 on the same data: throughput and loss side by side.

    python benchmarks/precision.py [--layers 12 --hidden 768] [--repeat 40] [--epochs 1]

Needs no download: a BERT-shaped model is built from a config (random weights) with a WordPiece
tokenizer trained on the shipped sample reviews, which are repeated to make an epoch. Meant for
GPUs (bf16); on CPUs without native bf16 the bf16 run is expected to be slower.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "precision"


def build_model(folder: Path, layers: int, hidden: int) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    texts = [line.split("\t")[0] for line in
             (ROOT / "examples/sentiment/train.tsv").read_text().splitlines()[1:]]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000,
                                                             special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]", model_max_length=512)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    OUT.mkdir(parents=True, exist_ok=True)
    model = build_model(OUT / "model", args.layers, args.hidden)
    lines = (ROOT / "examples/sentiment/train.tsv").read_text().splitlines()
    train = OUT / "train.tsv"
    train.write_text("\n".join(lines[:1] + lines[1:] * args.repeat) + "\n")
    results = {}
    for precision in ("no", "bf16"):
        cfg = load_config("classify", None, {
            "model": str(model), "output": str(OUT / f"run-{precision}"),
            "data.train": str(train), "data.validation": str(ROOT / "examples/sentiment/dev.tsv"),
            "train.epochs": args.epochs, "train.batch_size": args.batch_size,
            "train.learning_rate": 2e-5, "train.mixed_precision": precision})
        start = time.perf_counter()
        out = finetune(cfg, overwrite=True)
        metrics = json.loads((out / "metrics.json").read_text())
        results[precision] = {"wall_seconds": round(time.perf_counter() - start, 1),
                              **{k: metrics["run"][k] for k in ("train_samples_per_second",
                                                                "device", "mixed_precision")},
                              "eval_loss": metrics["history"][-1]["eval_loss"],
                              "accuracy": metrics["history"][-1]["accuracy"]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "args": vars(args), "results": results}, indent=1))
    ratio = (results["bf16"]["train_samples_per_second"]
             / results["no"]["train_samples_per_second"])
    print(f"bf16 / fp32 samples/s on {device}: {ratio:.2f}")


if __name__ == "__main__":
    main()
