"""`llmkit serve` under load: 1, 4 and 16 concurrent clients sending chat completions of 64 new
tokens (requests/s, new tokens/s, p50/p95 latency), beside `llmkit generate` on the same
prompts one at a time in this process; and /predict of a classifier at 1 and 32 clients.

    python benchmarks/serve.py [--layers 4] [--width 256] [--requests 32] [--tokens 64]

The models are random GPT-2 and BERT checkpoints (throughput does not depend on what the
weights learned) with a byte-level BPE tokenizer and a ChatML template. Each server is a real
process on 127.0.0.1 (`llmkit.serve.run_server`); nothing else should run on the machine.
Writes benchmarks/out/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the quick brown fox jumps over the lazy dog what is the capital of france paris is "
         "a gripping funny and moving film one of the best movies of the year").split()
SERVER = """import json, logging, sys
from llmkit.serve import Limits, run_server
logging.basicConfig(level=logging.INFO, format="%(message)s")
run_server(sys.argv[1], port=0, limits=Limits(**json.loads(sys.argv[2])), task=sys.argv[3] or None)
"""


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    made = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1024)
    made.chat_template = CHATML
    return made


def save_models(folder: Path, layers: int, width: int) -> tuple[Path, Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=4,
                               n_positions=1024, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.eos_token_id)).save_pretrained(folder / "gpt")
    tok.save_pretrained(folder / "gpt")
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * width, id2label={0: "bad", 1: "good"},
        label2id={"bad": 0, "good": 1})).save_pretrained(folder / "bert")
    tok.save_pretrained(folder / "bert")
    return folder / "gpt", folder / "bert"


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 9))
            for i in range(count)]


def start(model: Path, task: str = "", **limits: object) -> tuple[subprocess.Popen, str]:
    """A server on a port the system chooses (--port 0), read from its log line."""
    log = Path(tempfile.mkdtemp()) / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-c", SERVER, str(model), json.dumps(limits),
                                    task], stderr=sink)
    for _ in range(600):
        found = re.search(r" at (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGTERM)
    process.wait(60)


def load(clients: int, calls: list, send) -> dict[str, float]:
    """`send(call)` for every call, `clients` at a time: requests/s, new tokens/s, p50/p95."""
    def timed(call):
        begin = time.perf_counter()
        tokens = send(call)
        return time.perf_counter() - begin, tokens

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(timed, calls))
    wall = time.perf_counter() - begin
    latencies = sorted(t for t, _ in done)
    return {"clients": clients, "requests": len(calls), "requests_per_s": len(calls) / wall,
            "tokens_per_s": sum(n for _, n in done) / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def one_at_a_time(model: Path, texts: list[str], tokens: int) -> dict[str, float]:
    """`llmkit generate --chat` on each prompt alone, model loaded once."""
    from llmkit.inference.generate import GenerationSettings, generate, load_prompts

    net, tok, chats = load_prompts(str(model), texts, chat=True)
    settings = GenerationSettings(max_new_tokens=tokens)
    generate(net, tok, chats[:1], settings, templated=True)  # warm up
    return load(1, chats, lambda p: generate(net, tok, [p], settings, templated=True)[0][
        "new_tokens"])


def part(name: str, folder: Path, args: argparse.Namespace) -> dict:
    """A torch step in a process of its own: a client process whose idle torch threads share
    the cores with the server slows the server 5x (measured), which users' clients do not."""
    argv = [sys.executable, __file__, "--part", name, "--folder", str(folder),
            *(f"--{k}={v}" for k, v in vars(args).items() if k not in ("part", "folder"))]
    lines = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(lines.strip().splitlines()[-1] if lines.strip() else "{}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--part", default=None)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    texts = prompts(args.requests)
    if args.part == "models":
        save_models(args.folder, args.layers, args.width)
        return
    if args.part == "baseline":
        print(json.dumps(one_at_a_time(args.folder / "gpt", texts, args.tokens)))
        return
    folder = Path(tempfile.mkdtemp())
    part("models", folder, args)
    gpt, bert = folder / "gpt", folder / "bert"
    results: dict[str, object] = {"settings": vars(args) | {"folder": None, "part": None},
                                  "generate_one_at_a_time": part("baseline", folder, args)}
    process, url = start(gpt, max_batch_size=16, batch_wait_ms=5)
    try:
        http = httpx.Client(timeout=600)

        def chat(text: str) -> int:
            body = {"model": "gpt", "max_tokens": args.tokens,
                    "messages": [{"role": "user", "content": text}]}
            return http.post(url + "/v1/chat/completions", json=body).json()["usage"][
                "completion_tokens"]

        chat(texts[0])  # warm up
        results["serve_chat"] = [load(c, texts, chat) for c in (1, 4, 16)]
    finally:
        stop(process)
    process, url = start(bert, "classify", max_batch_size=32, batch_wait_ms=2)
    try:
        http = httpx.Client(timeout=600)
        rows = prompts(args.requests * 4)
        classify = lambda text: http.post(url + "/predict", json={"inputs": text}) and 0  # noqa: E731
        classify(rows[0])
        results["serve_predict"] = [load(c, rows, classify) for c in (1, 32)]
    finally:
        stop(process)
    report(results)


def report(results: dict) -> None:
    base = results["generate_one_at_a_time"]
    for row in results["serve_chat"]:
        row["tokens_per_s_vs_one_at_a_time"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["p50_vs_generate"] = row["p50_s"] / base["p50_s"]
    out = BENCH / "out" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
