"""`llmkit serve` as clients meet it: real server processes on tiny runs (full, adapter, merged;
causal, seq2seq, classify, qa), spoken to with the official openai client and httpx; answers
equal `llmkit generate` / `llmkit predict`; bad requests get OpenAI's error shape and the
server keeps answering; clients that leave stop their work."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
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
# server processes fork from one that imported these once (each would spend seconds on them)
FORKS = multiprocessing.get_context("forkserver")
PRELOAD = ["torch", "transformers.modeling_utils", "transformers.generation.utils", "datasets",
           "peft", "fastapi", "uvicorn", "llmkit.models", "llmkit.inference.predict",
           "llmkit.serve.app", "llmkit.serve.completions", "tests.test_serve"]
ADDRESS = re.compile(r"^serving .* at http://127\.0\.0\.1:(\d+)", re.MULTILINE)
JSON = {"Content-Type": "application/json"}
TEXT = "the quick brown fox jumps over the lazy dog\none of the best movies of the year\n" * 8


def serve(run: str, log: str, limits: dict[str, Any], key: str) -> None:
    """A server process's body: its output to `log`, then `llmkit serve`'s `run_server`."""
    import logging

    from llmkit.serve import Limits, run_server

    out = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    run_server(run, port=0, limits=Limits(**limits), api_key=key or None)


class Server:
    """A server process on 127.0.0.1, on the free port it asks the system for (its log line
    names it: nothing can take the port between a test's pick and the server's bind)."""

    def __init__(self, run: Path, log: Path, key: str = "", **limits: Any):
        self.key, self.log, self.port, self.url = key, log, 0, ""
        log.write_text("")
        self.process = FORKS.Process(target=serve, args=(str(run), str(log), limits, key),
                                     daemon=True)
        self.process.start()

    def wait(self) -> Server:
        for _ in range(600):
            assert self.process.is_alive(), self.log.read_text()[-3000:]
            address = ADDRESS.search(self.log.read_text())
            if address:
                self.port = int(address[1])
                self.url = f"http://127.0.0.1:{self.port}"
                try:
                    if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError("the server did not start: " + self.log.read_text()[-3000:])

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()

    def served(self) -> dict[str, int]:
        return httpx.get(self.url + "/info", headers=self.headers(), timeout=10).json()["served"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any
             ) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers(), **(headers or {})},
                          timeout=60, **kwargs)

    def stop(self) -> int | None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        return self.process.exitcode


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
def servers(tiny_bert: Path, tiny_seq2seq: Callable[[str], Path], toy: dict[str, Path],
            toy_translation: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A chat-templated GPT-2 run, a LoRA (adapter) classifier and its merged model, a SQuAD
    2.0 run and a T5 translation run, each served as soon as it is made (the servers start
    while the next run trains)."""
    from llmkit.inference.predict import merge

    folder = tmp_path_factory.mktemp("serve")
    (folder / "text.txt").write_text(TEXT)
    FORKS.set_forkserver_preload(PRELOAD)
    made: dict[str, Path] = {}
    started: dict[str, Server] = {}
    try:
        made["gpt"] = train("generate", chat_gpt2(folder / "g"), folder / "text.txt",
                            folder / "gpt", **{"data.block_size": 16})
        started["gpt"] = Server(made["gpt"], folder / "gpt.log", KEY, max_body_bytes=20_000,
                                max_n=4, max_tokens=120)
        made["sst"] = train("classify", tiny_bert, toy["train"], folder / "sst",
                            **{"adapter.lora": True, "adapter.lora_r": 4})
        started["sst"] = Server(made["sst"], folder / "sst.log", max_concurrent=2)
        made["merged"] = merge(made["sst"], folder / "merged")
        started["merged"] = Server(made["merged"], folder / "merged.log")
        # enough steps that it answers its question and leaves the unanswerable one empty
        made["squad"] = train("qa", tiny_bert, write_squad(folder / "squad.json"),
                              folder / "squad", **{"data.max_length": 48, "data.doc_stride": 16,
                                                   "train.max_steps": 20,
                                                   "train.learning_rate": 3e-3})
        started["squad"] = Server(made["squad"], folder / "squad.log")
        made["t5"] = train("translate", tiny_seq2seq("t5"), toy_translation["train"],
                           folder / "t5", **{"data.source_lang": "en", "data.target_lang": "es"})
        started["t5"] = Server(made["t5"], folder / "t5.log")
        yield {name: server.wait() for name, server in started.items()}, made
    finally:
        for server in started.values():
            server.stop()


def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key or "none",
                         max_retries=0)


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


def test_each_choice_has_its_own_finish_reason(servers) -> None:
    """n > 1: a choice that a stop string ends says "stop", one that runs to max_tokens in the
    same request says "length" (not one guess from the request's total tokens)."""
    gpt = client(servers[0]["gpt"])
    ask = {"model": "gpt", "prompt": "the quick", "max_tokens": 12, "temperature": 1.0,
           "seed": 5, "n": 4}
    free = gpt.completions.create(**ask)
    texts = [c.text for c in free.choices]
    # a stop string in some choices' text and not in the others': the seed draws the same
    # tokens, and only the choices holding it stop early
    stop = next(t[i:i + 3] for t in texts for i in range(len(t) - 2)
                if t[i:i + 3].strip() and "\ufffd" not in t[i:i + 3]
                and 0 < sum(t[i:i + 3] in u for u in texts) < len(texts))
    cut = gpt.completions.create(**ask, stop=[stop])
    expected = ["stop" if stop in c.text or c.finish_reason == "stop" else "length"
                for c in free.choices]
    assert [c.finish_reason for c in cut.choices] == expected
    assert set(expected) == {"stop", "length"}
    assert [c.text for c in cut.choices] == [t.split(stop)[0] for t in texts]
    streamed: dict[int, str] = {}
    for chunk in gpt.completions.create(**ask, stop=[stop], stream=True):
        for choice in chunk.choices:
            if choice.finish_reason:
                streamed[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(4)] == expected


def test_concurrent_clients_are_batched(servers) -> None:
    """Requests that arrive while the model works wait for it and then run together (a long
    stream keeps it busy while they come)."""
    gpt = servers[0]["gpt"]
    before = gpt.served()
    openai_gpt = client(gpt)
    prompts = ["the quick brown fox", "one of the best", "the lazy dog", "what a"] * 2
    busy = {"model": "gpt", "prompt": "the", "max_tokens": 120, "stream": True}
    with ThreadPoolExecutor(9) as pool, httpx.stream(
            "POST", gpt.url + "/v1/completions", json=busy, headers=gpt.headers(),
            timeout=60) as long:
        lines = long.iter_lines()
        next(lines)  # its batch is running
        answers = list(pool.map(lambda p: openai_gpt.completions.create(
            model="gpt", prompt=p, max_tokens=16, stream=p.startswith("the")), prompts))
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert len(answers) == 8
    after = gpt.served()
    assert after["requests"] - before["requests"] == 9
    assert after["batches"] - before["batches"] < 9  # some of the eight ran as one


def test_requests_queued_while_the_model_works_run_as_one_batch() -> None:
    """The batcher, deterministically: what queues while a batch runs becomes the next batch
    (up to its size, same key only); a request given up before its batch is skipped."""
    from llmkit.serve.batching import Batcher

    release, seen = threading.Event(), []

    def work(key: Any, items: list[int]) -> list[int]:
        seen.append(items)
        release.wait(30) if len(seen) == 1 else None
        return [i * 10 for i in items]

    async def main() -> tuple[list[Any], Batcher]:
        batcher = Batcher(work, max_batch_size=4, wait_s=0)
        worker = asyncio.create_task(batcher.run())
        first = asyncio.ensure_future(batcher.submit(0))
        while not batcher.busy:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i, "other" if i == 6 else None))
                for i in range(1, 7)]
        while batcher.queue.qsize() < 6:
            await asyncio.sleep(0)
        rest[2].cancel()  # 3's client left
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        worker.cancel()
        return results, batcher

    results, batcher = asyncio.run(main())
    batcher.close()
    assert seen == [[0], [1, 2, 4], [5], [6]]
    assert [r for r in results if not isinstance(r, BaseException)] == [0, 10, 20, 40, 50, 60]
    assert (batcher.batches, batcher.requests, batcher.cancelled, batcher.waiting) == (4, 6, 1, 0)


def test_an_adapter_run_s_predict_equals_llmkit_predict(servers, toy: dict[str, Path]) -> None:
    from llmkit.inference.predict import predict

    live, made = servers
    assert (made["sst"] / "adapter_config.json").is_file()  # LoRA: no full model saved
    assert not (made["sst"] / "model.safetensors").exists()
    rows = predict(str(made["sst"]), str(toy["validation"]))[:4]
    texts = [r["text"] for r in rows]
    got = live["sst"].post("/predict", json={"inputs": texts}).json()
    assert [g[0]["label"] for g in got] == [r["label"] for r in rows]
    assert [g[0]["score"] for g in got] == pytest.approx([r["score"] for r in rows], abs=1e-5)
    one = live["sst"].post("/predict", json={"inputs": texts[0], "raw_scores": True}).json()
    assert {s["label"] for s in one} == {"bad", "good"} and one[0]["score"] >= one[1]["score"]
    info = httpx.get(live["sst"].url + "/info").json()
    assert info["task"] == "classify" and info["labels"] == ["bad", "good"]


def test_a_merged_run_s_predict_equals_llmkit_predict(servers, toy: dict[str, Path]) -> None:
    from llmkit.inference.predict import predict

    live, made = servers
    rows = predict(str(made["merged"]), str(toy["validation"]))[:4]
    texts = [r["text"] for r in rows]
    got = live["merged"].post("/predict", json={"inputs": texts}).json()
    assert [g[0]["label"] for g in got] == [r["label"] for r in rows]
    assert [g[0]["score"] for g in got] == pytest.approx([r["score"] for r in rows], abs=1e-5)
    adapter = live["sst"].post("/predict", json={"inputs": texts}).json()  # the run it came from
    assert [g[0]["label"] for g in adapter] == [r["label"] for r in rows]
    assert [g[0]["score"] for g in adapter] == pytest.approx([r["score"] for r in rows],
                                                             abs=1e-4)


def qa_spans(run: Path) -> Callable[[str, str], dict[str, Any]]:
    """The QA post-processing's answer, score and offsets for a question and its context,
    called directly on the model's outputs (as predict runs the model)."""
    from datasets import Dataset

    from llmkit.inference.predict import outputs, prepare
    from llmkit.tasks.qa import present

    task, data, net, tokenizer = prepare(str(run), None, None)

    def spans(question: str, context: str) -> dict[str, Any]:
        rows = Dataset.from_dict({"question": [question], "context": [context]})
        features = task.featurize(rows, tokenizer, net.config, data)
        arrays, order = outputs(task, net, tokenizer, features, 8)
        [record] = present(arrays, features.select(order), data, net.config, tokenizer,
                           scored=True)
        return record

    return spans


def test_qa_answers_with_the_chosen_span_s_score_and_offsets(servers) -> None:
    """The span the model chose, where its text occurs earlier in the context too, and the
    SQuAD 2.0 run's empty answer: answer, score and offsets as the post-processing gives."""
    from llmkit.inference.predict import predict_rows

    live, made = servers
    question = "what is the capital of france ?"
    [expected] = predict_rows(str(made["squad"]), None, None, None, 8, question, CONTEXT, {})
    got = live["squad"].post("/v1/qa", json={"question": question, "context": CONTEXT}).json()
    assert got["answer"] == expected["answer"] == CONTEXT[got["start"]:got["end"]] != ""
    cases = [(q, c) for q in (question, "who loved every minute ?")
             for c in ("paris paris paris", "the cast . the cast . the cast", CONTEXT,
                       "i loved every minute . the cast is wonderful .",
                       "france . paris . france . paris", "wonderful paris . wonderful paris")]
    kinds: dict[str, tuple[str, str, dict[str, Any]]] = {}
    spans = qa_spans(made["squad"])
    for q, c in cases:
        direct = spans(q, c)
        kind = ("empty" if not direct["answer"] else
                "later" if c.find(direct["answer"]) < direct["start"] else "first")
        kinds.setdefault(kind, (q, c, direct))
    # the empty answer is always there; whether a 20-step model picks a later occurrence of
    # its answer's text depends on its weights (a fresh machine's run picked the first ones)
    assert "empty" in kinds, kinds
    for q, c, direct in kinds.values():
        got = live["squad"].post("/v1/qa", json={"question": q, "context": c}).json()
        assert {k: got[k] for k in ("answer", "start", "end")} == {
            k: direct[k] for k in ("answer", "start", "end")}, (q, c)
        assert got["score"] == pytest.approx(direct["score"], abs=1e-4)
    for _, c, direct in kinds.values():
        assert direct["start"] < 0 or c[direct["start"]:direct["end"]] == direct["answer"]
    assert kinds["empty"][2]["start"] == kinds["empty"][2]["end"] == -1


def test_a_seq2seq_run_answers_as_generate_and_sigterm_lets_its_stream_finish(
        servers) -> None:
    """A T5 translation run (its source prefix) equals llmkit generate; SIGTERM, the only
    one this server gets, lets the stream in flight finish, then the server stops."""
    from llmkit.inference.generate import GenerationSettings, generate, load_prompts

    live, made = servers
    t5 = live["t5"]
    sources = ["the house is small", "a red dog eats bread"]
    net, tokenizer, prompts = load_prompts(str(made["t5"]), sources)
    assert prompts[0] != sources[0]  # T5 reads the task's prefix first
    expected = generate(net, tokenizer, prompts, GenerationSettings(max_new_tokens=8))
    for source, record in zip(sources, expected, strict=True):
        got = client(t5).completions.create(model="t5", prompt=source, max_tokens=8)
        assert got.choices[0].text == record["output"]
        assert got.usage.completion_tokens == record["new_tokens"]
        streamed = "".join(c.choices[0].text for c in client(t5).completions.create(
            model="t5", prompt=source, max_tokens=8, stream=True))
        assert streamed == record["output"]
    body = {"model": "t5", "prompt": sources[0], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", t5.url + "/v1/completions", json=body, timeout=60) as answer:
        lines = answer.iter_lines()
        next(lines)
        os.kill(t5.process.pid, signal.SIGTERM)
        assert [line for line in lines if line][-1] == "data: [DONE]"
    # uvicorn raises the signal again once it has shut down, so the status is SIGTERM's
    t5.process.join(30)
    assert t5.process.exitcode in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(t5.url + "/health", timeout=5)
    log = t5.log.read_text()
    assert f"at http://127.0.0.1:{t5.port}" in log and "stopped serving t5" in log, log


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


def test_a_chunked_body_over_the_limit_gets_413(servers) -> None:
    """A body sent without its length is read up to the limit: past it, 413 in OpenAI's shape;
    within it, answered as any other."""
    gpt = servers[0]["gpt"]

    def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
        yield from (body[i:i + size] for i in range(0, len(body), size))

    ok = {"model": "gpt", "prompt": "the quick", "max_tokens": 2}
    big = json.dumps({**ok, "prompt": "x" * 30_000}).encode()
    answer = gpt.post("/v1/completions", content=chunks(big), headers=JSON)
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "body_too_large"
    assert gpt.post("/v1/completions", content=chunks(json.dumps(ok).encode(), 7),
                    headers=JSON).status_code == 200
    assert gpt.post("/v1/completions", json=ok).status_code == 200


def wait_until(check: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never true: {what}")


def test_too_many_requests_in_flight_get_429(servers) -> None:
    """Two requests held in flight (their bodies unfinished) fill a server that takes two: the
    third gets 429, and once they finish the server answers again."""
    sst = servers[0]["sst"]
    release = threading.Event()

    def held() -> Iterator[bytes]:
        yield b'{"inputs": '
        release.wait(30)
        yield b'"great"}'

    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(sst.post, "/predict", content=held(), headers=JSON)
                for _ in range(2)]
        try:
            wait_until(lambda: sst.health()["in_flight"] == 2, "two requests in flight")
            refused = sst.post("/predict", json={"inputs": "great"})
        finally:
            release.set()
        assert [s.result().status_code for s in slow] == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert sst.post("/predict", json={"inputs": "great"}).status_code == 200


def test_a_client_leaving_mid_stream_stops_its_generation(servers) -> None:
    """Left alone the prompt runs to max_tokens; its client leaves after the first chunk: the
    server stops it short (its log says at how many tokens), holds no work, and answers."""
    gpt = servers[0]["gpt"]
    # its text comes from the first token (some prompts' first tokens are bytes of characters
    # that never complete, held back until the end)
    body = {"model": "gpt", "prompt": "one of the best", "max_tokens": 120}
    whole = gpt.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 120
    before, logged = gpt.served(), gpt.log.read_text()
    with httpx.stream("POST", gpt.url + "/v1/completions", json={**body, "stream": True},
                      headers=gpt.headers(), timeout=60) as answer:
        assert answer.status_code == 200
        next(answer.iter_lines())
    wait_until(lambda: gpt.health() == {"status": "ok", "busy": False, "in_flight": 0,
                                        "waiting": 0}, "no work left")
    assert gpt.served()["cancelled"] == before["cancelled"] + 1
    stops = re.findall(r"client left, after (\d+) of 120 tokens",
                       gpt.log.read_text()[len(logged):])
    assert len(stops) == 1 and int(stops[0]) < 120
    assert gpt.post("/v1/completions", json=body).json()["choices"][0]["text"] == \
        whole["choices"][0]["text"]


def test_a_prompt_whose_client_left_stops_at_the_next_token(servers) -> None:
    """In the model's thread: the row stops one token after its request is given up; the
    prompt beside it in the batch runs on to its own end, as alone."""
    from llmkit.inference.generate import GenerationSettings, generate
    from llmkit.serve.engine import Prompt, complete, load_engine

    engine = load_engine(str(servers[1]["gpt"]))
    settings = GenerationSettings(max_new_tokens=40)
    heard: list[str] = []

    def sink(choice: int, text: str) -> None:
        heard.append(text)
        if len(heard) == 3:
            leaving.left.set()

    leaving = Prompt("the quick", sink)
    [alone] = complete(engine, (settings, False), [leaving])
    assert alone["new_tokens"] == 4 and len(heard) == 4  # the three heard, and the next
    assert complete(engine, (settings, False), [Prompt("the quick")])[0]["new_tokens"] == 40
    heard.clear()
    leaving = Prompt("the quick", sink)
    stopped, other = complete(engine, (settings, False), [leaving, Prompt("one of the best")])
    assert len(heard) == 4
    [expected] = generate(engine.net, engine.tokenizer, ["one of the best"], settings)
    assert (other["output"], other["new_tokens"]) == (expected["output"], 40)
    assert other["reasons"] == ["length"]


def test_a_whole_answer_whose_client_left_stops_at_the_next_token(servers) -> None:
    """A request without streaming whose client has gone (Starlette's is_disconnected) stops
    its generation at the next token instead of running to max_tokens."""
    from llmkit.inference.generate import GenerationSettings
    from llmkit.serve.batching import Batcher
    from llmkit.serve.completions import respond
    from llmkit.serve.engine import load_engine, work_of
    from llmkit.serve.limits import Limits
    from llmkit.serve.schemas import CompletionRequest

    engine = load_engine(str(servers[1]["gpt"]))
    body = CompletionRequest(model="gpt", prompt="the quick", max_tokens=100)

    async def main(gone: bool) -> dict[str, Any]:
        batcher = Batcher(work_of(engine), 4, 0.005)
        running = asyncio.create_task(batcher.run())

        async def disconnected() -> bool:
            return gone

        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
            engine=engine, limits=Limits(), batcher=batcher)), is_disconnected=disconnected)
        try:
            return await respond(request, body, ["the quick"],  # type: ignore[arg-type]
                                 GenerationSettings(max_new_tokens=100), False)
        finally:
            running.cancel()
            batcher.close()

    assert asyncio.run(main(False))["usage"]["completion_tokens"] == 100
    assert asyncio.run(main(True))["usage"]["completion_tokens"] <= 2


def test_a_stream_whose_client_leaves_leaves_no_task_behind() -> None:
    """The stream's side, deterministically: its client leaving (the response task cancelled,
    as Starlette cancels it) gives its prompt up and leaves no task waiting."""
    from llmkit.inference.generate import GenerationSettings
    from llmkit.serve.completions import Answer, stream

    class Stalled:  # a model that says one token, then never finishes
        def __init__(self) -> None:
            self.prompts: list[Any] = []

        async def submit(self, prompt: Any, key: Any) -> Any:
            self.prompts.append(prompt)
            prompt.sink(0, "hello")
            await asyncio.Event().wait()

    async def main() -> tuple[Any, list[str], set[asyncio.Task[Any]]]:
        batcher = Stalled()
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(batcher=batcher)))
        chunks = stream(request, Answer("m", False, GenerationSettings(max_new_tokens=100)),
                        ["hi"], False)  # type: ignore[arg-type]
        got: list[str] = []

        async def respond() -> None:
            async for chunk in chunks:
                got.append(chunk)

        responding = asyncio.create_task(respond())
        while not got:
            await asyncio.sleep(0)
        responding.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        return batcher, got, asyncio.all_tasks() - {asyncio.current_task()}

    batcher, got, left = asyncio.run(main())
    assert len(got) == 1 and '"hello"' in got[0]
    assert batcher.prompts[0].left.is_set()  # its rows stop at the next token
    assert not left, left
