"""`llmkit serve` as clients meet it: real server processes on tiny runs, spoken to with the
official openai client and httpx; answers equal `llmkit generate` / `llmkit predict`; bad
requests get OpenAI's error shape and the server keeps answering."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from tests.conftest import bpe_tokenizer

openai = pytest.importorskip("openai")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
KEY = "test-key"
SERVER = """import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from llmkit.serve import Limits, run_server
run_server(sys.argv[1], port=int(sys.argv[2]), limits=Limits(**json.loads(sys.argv[3])),
           api_key=sys.argv[4] or None)
"""
TEXT = "the quick brown fox jumps over the lazy dog\none of the best movies of the year\n" * 8


class Server:
    """A server process on a free port of 127.0.0.1, its log in a file."""

    def __init__(self, run: Path, log: Path, key: str = "", **limits: Any):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.key, self.log = f"http://127.0.0.1:{self.port}", key, log
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(run), str(self.port), json.dumps(limits), key],
            stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self) -> Server:
        for _ in range(600):
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not start: " + self.log.read_text()[-3000:])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers(), timeout=60, **kwargs)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


CONTEXT = "paris is the capital of france . the cast is wonderful ."


def write_squad(path: Path) -> Path:
    """SQuAD 2.0 JSON with one short context: one window per question."""
    qas = [{"id": f"q{i}", "question": "what is the capital of france ?", "is_impossible": False,
            "answers": [{"text": "paris", "answer_start": 0}]} for i in range(6)]
    qas += [{"id": f"n{i}", "question": "who loved every minute ?", "answers": [],
             "is_impossible": True} for i in range(2)]
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": qas}]}]}))
    return path


def chat_gpt2(folder: Path) -> Path:
    """A tiny random GPT-2 whose tokenizer has ChatML's markers and template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template, tokenizer.model_max_length = CHATML, 128
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                               n_positions=128, bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(task: str, model: Path, data: Path, out: Path, **extra: Any) -> Path:
    """A run of a few steps."""
    return finetune(load_config(task, None, {
        "model": str(model), "output": str(out), "data.train": str(data),
        "data.validation": str(data), "train.batch_size": 4, "train.max_steps": 3,
        "train.learning_rate": 1e-3, **extra}))


@pytest.fixture(scope="module")
def servers(tiny_bert: Path, toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A chat-templated GPT-2 run, a classifier and a SQuAD 2.0 run, each served as soon as it
    is trained (the servers start while the next run trains)."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "text.txt").write_text(TEXT)
    made: dict[str, Path] = {}
    started: dict[str, Server] = {}
    try:
        made["gpt"] = train("generate", chat_gpt2(folder / "g"), folder / "text.txt",
                            folder / "gpt", **{"data.block_size": 16})
        started["gpt"] = Server(made["gpt"], folder / "gpt.log", KEY, max_body_bytes=20_000,
                                max_n=4, max_tokens=64)
        made["sst"] = train("classify", tiny_bert, toy["train"], folder / "sst")
        # a long batch wait keeps requests in flight: the third at once gets 429
        started["sst"] = Server(made["sst"], folder / "sst.log", max_concurrent=2,
                                batch_wait_ms=300)
        made["squad"] = train("qa", tiny_bert, write_squad(folder / "squad.json"),
                              folder / "squad", **{"data.max_length": 48,
                                                   "data.doc_stride": 16})
        started["squad"] = Server(made["squad"], folder / "squad.log")
        yield {name: server.wait() for name, server in started.items()}, made
    finally:
        for server in started.values():
            server.stop()


def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)


def test_openai_client_gets_what_llmkit_generate_gives(servers) -> None:
    from llmkit.inference.generate import GenerationSettings, generate, templated
    from llmkit.models import load_generator

    (live, made) = servers
    gpt = client(live["gpt"])
    assert [m.id for m in gpt.models.list().data] == ["gpt"]
    net, tokenizer = load_generator(str(made["gpt"]))
    settings = GenerationSettings(max_new_tokens=8)
    for prompt in ("the quick brown", "one of the best movies"):
        [expected] = generate(net, tokenizer, [prompt], settings)
        got = gpt.completions.create(model="gpt", prompt=prompt, max_tokens=8)
        assert got.choices[0].text == expected["output"]
        assert got.usage.prompt_tokens == expected["prompt_tokens"]
        assert got.usage.completion_tokens == expected["new_tokens"]
        streamed = "".join(c.choices[0].text for c in gpt.completions.create(
            model="gpt", prompt=prompt, max_tokens=8, stream=True))
        assert streamed == expected["output"]
    chat = [{"role": "user", "content": "the quick brown fox"}]
    [expected] = generate(net, tokenizer, [templated(tokenizer, chat)], settings, templated=True)
    got = gpt.chat.completions.create(model="gpt", messages=chat, max_tokens=8)
    assert got.choices[0].message.content == expected["output"]
    assert got.choices[0].message.role == "assistant"
    chunks = list(gpt.chat.completions.create(model="gpt", messages=chat, max_tokens=8,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        expected["output"]
    assert chunks[-1].usage.completion_tokens == expected["new_tokens"]


def test_sampling_n_seed_and_stop(servers) -> None:
    gpt = client(servers[0]["gpt"])
    ask = {"model": "gpt", "prompt": "the quick", "max_tokens": 12, "temperature": 1.0,
           "top_p": 0.9, "seed": 3}
    one, again = (gpt.completions.create(**ask, n=3) for _ in range(2))
    assert len(one.choices) == 3 and [c.index for c in one.choices] == [0, 1, 2]
    assert [c.text for c in one.choices] == [c.text for c in again.choices]  # the seed holds
    text = one.choices[0].text
    if len(text) > 3:
        stop = text[2:4]
        cut = gpt.completions.create(**ask, n=1, stop=[stop]).choices[0].text
        assert stop not in cut


def test_concurrent_clients_are_batched(servers) -> None:
    live = servers[0]
    before = httpx.get(live["gpt"].url + "/info", headers=live["gpt"].headers()).json()["served"]
    gpt = client(live["gpt"])
    prompts = ["the quick brown fox", "one of the best", "the lazy dog", "what a"] * 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: gpt.completions.create(
            model="gpt", prompt=p, max_tokens=16, stream=p.startswith("the")), prompts))
    assert len(answers) == 8
    after = httpx.get(live["gpt"].url + "/info", headers=live["gpt"].headers()).json()["served"]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some arrived together and ran as one


def test_predict_and_qa_equal_llmkit_predict(servers, toy: dict[str, Path]) -> None:
    from llmkit.inference.predict import predict, predict_rows

    live, made = servers
    rows = predict(str(made["sst"]), str(toy["validation"]))[:4]
    texts = [r["text"] for r in rows]
    got = live["sst"].post("/predict", json={"inputs": texts}).json()
    assert [g[0]["label"] for g in got] == [r["label"] for r in rows]
    assert [g[0]["score"] for g in got] == pytest.approx([r["score"] for r in rows], abs=1e-5)
    one = live["sst"].post("/predict", json={"inputs": texts[0], "raw_scores": True}).json()
    assert {s["label"] for s in one} == {"bad", "good"} and one[0]["score"] >= one[1]["score"]
    info = httpx.get(live["sst"].url + "/info").json()
    assert info["task"] == "classify" and info["labels"] == ["bad", "good"]
    question = "what is the capital of france ?"
    [expected] = predict_rows(str(made["squad"]), None, None, None, 8, question, CONTEXT, {})
    got = live["squad"].post("/v1/qa", json={"question": question, "context": CONTEXT}).json()
    assert got["answer"] == expected["answer"]
    if got["answer"]:
        assert CONTEXT[got["start"]:got["end"]] == got["answer"]


def test_bad_requests_are_refused_and_the_server_keeps_answering(servers) -> None:
    live = servers[0]
    gpt, sst = live["gpt"], live["sst"]
    ok = {"model": "gpt", "prompt": "the quick", "max_tokens": 2}
    tried = [  # (server, path, body or raw bytes, headers, status)
        (gpt, "/v1/completions", b"{not json", None, 400),
        (gpt, "/v1/completions", b"{not json", {"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {KEY}"}, 400),
        (gpt, "/v1/completions", b"[1, 2]", None, 400),
        (gpt, "/v1/completions", {**ok, "max_tokens": "many"}, None, 422),
        (gpt, "/v1/completions", {**ok, "prompt": 5}, None, 422),
        (gpt, "/v1/completions", {**ok, "model": "gpt-4"}, None, 404),
        (gpt, "/v1/completions", {**ok, "prompt": ""}, None, 400),
        (gpt, "/v1/completions", {**ok, "prompt": "the dog " * 100}, None, 400),
        (gpt, "/v1/completions", {**ok, "prompt": "x" * 30_000}, None, 413),
        (gpt, "/v1/completions", {**ok, "max_tokens": 10_000}, None, 400),
        (gpt, "/v1/completions", {**ok, "n": 2}, None, 400),  # greedy finds one
        (gpt, "/v1/completions", ok, {"Authorization": "Bearer wrong"}, 401),
        (gpt, "/v1/chat/completions", {"model": "gpt", "messages": []}, None, 422),
        (gpt, "/v1/embeddings", ok, None, 404),
        (gpt, "/predict", {"inputs": "x"}, None, 404),
        (sst, "/predict", {"inputs": []}, None, 400),
        (sst, "/predict", {"inputs": [["a", "b"]]}, None, 422),
        (sst, "/predict", {"inputs": "great " * 300}, None, 413)]
    for server, path, body, headers, status in tried:
        sent = {"content": body} if isinstance(body, bytes) else {"json": body}
        answer = httpx.post(server.url + path, headers=headers or server.headers(), timeout=60,
                            **sent)
        assert answer.status_code == status, (path, body, answer.text)
        error = answer.json()["error"]
        assert error["message"] and "Traceback" not in answer.text, answer.text
        assert gpt.post("/v1/completions", json=ok).status_code == 200  # still serving
    assert httpx.get(gpt.url + "/info").status_code == 401  # the key guards all but /health
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gpt.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert sst.post("/predict", json={"inputs": "great " * 300, "truncate": True}).status_code \
        == 200


def test_too_many_requests_in_flight_get_429(servers) -> None:
    sst = servers[0]["sst"]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: sst.post("/predict", json={"inputs": "great"}),
                              range(6)))
    assert {c.status_code for c in codes} == {200, 429}
    assert all(c.json()["error"]["type"] == "rate_limit_error" for c in codes
               if c.status_code == 429)
    assert sst.post("/predict", json={"inputs": "great"}).status_code == 200


def test_a_client_leaving_mid_stream_leaves_the_server_serving(servers) -> None:
    gpt = servers[0]["gpt"]
    body = {"model": "gpt", "prompt": "the quick", "max_tokens": 64, "stream": True}
    with httpx.stream("POST", gpt.url + "/v1/completions", json=body, headers=gpt.headers(),
                      timeout=60) as answer:
        assert answer.status_code == 200
        next(answer.iter_lines())
    assert gpt.post("/v1/completions", json={**body, "stream": False}).status_code == 200
    assert httpx.get(gpt.url + "/health").json()["status"] == "ok"


def test_sigterm_stops_the_server_cleanly(servers) -> None:
    squad = servers[0]["squad"]
    # uvicorn raises the signal again once it has shut down, so the status is SIGTERM's
    assert squad.stop() in (0, -signal.SIGTERM)
    log = squad.log.read_text()
    assert f"at http://127.0.0.1:{squad.port}" in log and "stopped serving squad" in log, log
