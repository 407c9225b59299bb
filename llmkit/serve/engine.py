"""The served model: loaded once, by task, and the batch functions the queue calls in its
worker thread (one forward for texts to classify or questions to answer, one `generate` for
prompts)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmkit.inference.generate import GenerationSettings

log = logging.getLogger("llmkit")
ENCODER_TASKS = ("classify", "qa")


@dataclass
class Engine:
    """A loaded model and what its endpoints need to know about it."""

    name: str  # the model id clients name (OpenAI's `model`)
    task: str  # the run's task: classify, qa, generate, translate, summarize
    net: Any
    tokenizer: Any
    data: Any = None  # an encoder run's column settings (ClassifyData, QAData)
    prefix: str = ""  # a translate or summarize run's source prefix
    context: int | None = None  # tokens the model takes at once (None: no limit)
    labels: list[str] = field(default_factory=list)

    @property
    def generates(self) -> bool:
        return self.task not in ENCODER_TASKS

    @property
    def streams(self) -> bool:
        """transformers streams greedy and sampled decoding, not beam search (a seq2seq run may
        keep its evaluation's beams in its generation config)."""
        return (self.net.generation_config.num_beams or 1) == 1


def chosen_task(model: str, task: str | None) -> str:
    """The task to serve: --task, else the run's, else generation for a decoder or seq2seq
    checkpoint (an encoder checkpoint has no one task)."""
    from llmkit.inference.predict import run_config
    from llmkit.models import model_config
    from llmkit.tasks import fits, get_task

    saved = run_config(model)
    if task is not None:
        get_task(task)  # an unknown name is one line
        if saved and saved.task != task:
            raise LlmkitError(f"{model} is a {saved.task} run: drop --task or give {saved.task}")
        return task
    if saved is not None:
        return saved.task
    config = model_config(model)
    if config.is_encoder_decoder or fits(get_task("generate"), config):
        return "generate"
    raise LlmkitError(f"{model} is a {config.model_type} checkpoint, not a run directory: give "
                      "--task classify or --task qa")


def load_engine(model: str, task: str | None = None, name: str | None = None,
                base_model: str | None = None) -> Engine:
    """The model of a run directory (or checkpoint), ready to serve."""
    from llmkit.models import inference_device
    from llmkit.tasks.task import context_size

    chosen = chosen_task(model, task)
    if chosen == "reward":
        raise LlmkitError(f"{model} is a reward model, and llmkit serve has no route for its "
                          f"scores yet: score texts with llmkit predict --model {model}")
    served = name or Path(model).resolve().name
    if chosen in ENCODER_TASKS:
        from llmkit.inference.predict import prepare

        _, data, net, tokenizer = prepare(model, chosen, None, base_model)
        net.to(inference_device()).eval()
        labels = [str(v) for _, v in sorted((int(k), v) for k, v in
                                           (net.config.id2label or {}).items())]
        return Engine(served, chosen, net, tokenizer, data, "",
                      context_size(net.config, tokenizer), labels if chosen == "classify" else [])
    from llmkit.inference.generate import load_prompts, run_prefix

    net, tokenizer, _ = load_prompts(model, [], base_model=base_model)
    return Engine(served, chosen, net, tokenizer, None, run_prefix(model, net.config),
                  context_size(net.config, tokenizer))


def run_rows(engine: Engine, columns: dict[str, list[str]]
             ) -> tuple[dict[str, Any], Any, list[int]]:
    """The task's outputs for rows given as columns, in one batch, as `llmkit predict` makes
    them; with the features and their order."""
    from datasets import Dataset

    from llmkit.inference.predict import outputs
    from llmkit.tasks import get_task

    task = get_task(engine.task)
    rows = task.usable(Dataset.from_dict(columns), engine.data, False)
    features = task.featurize(rows, engine.tokenizer, engine.net.config, engine.data)
    # a fixed forward size: one long qa context must not become thousands of windows at once
    arrays, order = outputs(task, engine.net, engine.tokenizer, features, 64)
    return arrays, features, order


def classify(engine: Engine, key: Any, texts: list[tuple[str, str | None]]) -> list[Any]:
    """Each text's (or pair's) logits, one forward for all."""
    data = engine.data
    columns = {data.text_column: [t for t, _ in texts]}
    if data.text_pair_column:
        columns[data.text_pair_column] = [p or "" for _, p in texts]
    arrays, _, order = run_rows(engine, columns)
    logits: list[Any] = [None] * len(texts)
    for row, position in enumerate(order):
        logits[position] = arrays["logits"][row]
    return logits


def answer(engine: Engine, key: Any, questions: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each question's answer from its context (every window of every context in one pass),
    with its score and character offsets as the task's post-processing found them."""
    from llmkit.tasks.qa import present

    data = engine.data
    arrays, features, order = run_rows(engine, {
        data.question_column: [q for q, _ in questions],
        data.context_column: [c for _, c in questions]})
    records = present(arrays, features.select(order), data, engine.net.config,
                      engine.tokenizer, scored=True)
    found = {int(r.pop("id")): r for r in records}
    none = {"answer": "", "score": None, "start": -1, "end": -1}  # a row without windows
    return [found.get(i, none) for i in range(len(questions))]


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate for, as the model reads it; `sink(choice, text)` hears each
    choice's text so far while it is generated (None: the whole answer at once); `left` is set
    when its client has gone, and its rows stop at the next token."""

    text: str
    sink: Callable[[int, str], None] | None = None
    left: threading.Event = field(default_factory=threading.Event)


def complete(engine: Engine, key: tuple[GenerationSettings, bool], prompts: list[Prompt]
             ) -> list[dict[str, Any]]:
    """`llmkit generate` on prompts that share settings: one generate call, the records in
    prompt order, each with its choices' finish reasons (`reasons`) where the rows could be
    followed (not under beam search); streaming prompts hear their own tokens as they come,
    and the rows of prompts whose client left stop."""
    from transformers import StoppingCriteriaList

    from llmkit.inference.generate import generate
    from llmkit.serve.streaming import Abandoned, RowStreamer

    settings, templated = key
    tokenizer = engine.tokenizer
    lengths = [len(ids) for ids in tokenizer([p.text for p in prompts],
                                             add_special_tokens=not templated)["input_ids"]]
    # generate() orders prompts longest first (a stable sort): given in that order, its rows
    # are these prompts', so the streamer knows whose token is whose
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    n = settings.num_return_sequences
    rows = [(prompts[i], c) for i in order for c in range(n)]
    streamer, stopping, criterion = None, None, Abandoned([p.left for p, _ in rows])
    if engine.streams:  # no beams: generate's rows are these, prompts x choices
        streamer = RowStreamer(tokenizer, [(p.sink, c) for p, c in rows], ends(engine, templated))
        stopping = StoppingCriteriaList([criterion])
    records = generate(engine.net, tokenizer, [prompts[i].text for i in order], settings,
                       batch_size=len(prompts), streamer=streamer, templated=templated,
                       stopping=stopping)
    reasons = streamer.reasons(settings.stop) if streamer else []
    found: list[dict[str, Any]] = [{} for _ in prompts]
    for k, (record, i) in enumerate(zip(records, order, strict=True)):
        found[i] = {**record, "reasons": reasons[k * n:(k + 1) * n]} if reasons else record
    for row, tokens in criterion.stopped.items():
        if row % n == 0:
            log.info("stopped generating for a request whose client left, after %d of %d "
                     "tokens", tokens, settings.max_new_tokens)
    return found


def ends(engine: Engine, templated: bool) -> set[int]:
    """Tokens that end a sequence (and, for chat, a turn)."""
    from llmkit.tasks.chat import end_of_turn

    given = engine.net.generation_config.eos_token_id
    found = set(given if isinstance(given, list) else [] if given is None else [given])
    if engine.tokenizer.eos_token_id is not None:
        found.add(engine.tokenizer.eos_token_id)
    turn = end_of_turn(engine.tokenizer) if templated else None
    return found | ({turn} if turn is not None else set())


def work_of(engine: Engine) -> Callable[[Any, list[Any]], list[Any]]:
    """The batch function of this engine's task."""
    if engine.task == "classify":
        return lambda key, items: classify(engine, key, items)
    if engine.task == "qa":
        return lambda key, items: answer(engine, key, items)
    return lambda key, items: complete(engine, key, items)
