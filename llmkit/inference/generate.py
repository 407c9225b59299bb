"""Text generation: the model's own `generate`, KV cache on, prompts batched by length, under
`torch.inference_mode`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from llmkit.config.schema import setting
from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; greedy unless sampling is asked for."""

    max_new_tokens: int = setting(64, "Tokens to generate at most.", minimum=1)
    sample: bool = setting(False, "Sample instead of greedy decoding (implied by "
                           "--temperature, --top-k, --top-p).")
    temperature: float | None = setting(None, "Sampling temperature.", above=0.0)
    top_k: int | None = setting(None, "Sample from the k likeliest tokens.", minimum=1)
    top_p: float | None = setting(None, "Nucleus sampling mass.", above=0.0, maximum=1.0)
    num_beams: int | None = setting(None, "Beam search width (default: the model's generation "
                                    "config, e.g. what a seq2seq run evaluated with; else 1).",
                                    minimum=1)
    repetition_penalty: float | None = setting(None, "Penalty > 1 discourages repeats.",
                                               above=0.0)
    num_return_sequences: int = setting(1, "Outputs per prompt.", minimum=1)
    stop: tuple[str, ...] = setting((), "Stop at this string (repeatable; left out of the "
                                    "output).")
    seed: int | None = setting(None, "Seed, for repeatable sampling.", minimum=0,
                               maximum=2**32 - 1)

    def kwargs(self) -> dict[str, Any]:
        sampling = self.sample or any(v is not None for v in (self.temperature, self.top_k,
                                                              self.top_p))
        chosen = {"max_new_tokens": self.max_new_tokens, "do_sample": sampling,
                  "num_beams": self.num_beams, "num_return_sequences": self.num_return_sequences,
                  "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                  "repetition_penalty": self.repetition_penalty, "use_cache": True}
        return {k: v for k, v in chosen.items() if v is not None}


def run_prefix(folder: str, config: Any) -> str:
    """The source prefix a translate or summarize run directory was trained with, else ''."""
    from llmkit.inference.predict import run_config
    from llmkit.tasks.seq2seq import source_prefix

    saved = run_config(folder)
    if saved is None or saved.task not in ("translate", "summarize"):
        return ""
    return source_prefix(saved.task, saved.data, config)  # type: ignore[arg-type]


def load_prompts(model: str, given: list[Any], chat: bool = False, system: str | None = None,
                 base_model: str | None = None, chat_template: str | None = None
                 ) -> tuple[Any, Any, list[str]]:
    """The generator (exported.load_generator: a run's model, or an export's through ONNX
    Runtime), its tokenizer and the prompts as the model reads them: in the chat template
    (`given` are user turns or whole conversations; a --chat-template file replaces the
    tokenizer's), or after the source prefix a translate or summarize run was trained with
    ('summarize: ')."""
    from llmkit.inference.exported import load_generator
    from llmkit.tasks.chat import use_template

    net, tokenizer = load_generator(model, base_model)
    if chat:
        use_template(tokenizer, chat_template, required=False)
    prefix = run_prefix(model, net.config)
    return net, tokenizer, [templated(tokenizer, p, system) if chat else prefix + p
                            for p in given]


def read_prompts(path: str, chat: bool = False) -> list[Any]:
    """Prompts from a .txt file (one per line) or .jsonl rows with a `prompt` field; with
    `chat`, rows may hold `messages` instead: conversations to answer after their last turn."""
    from llmkit.scoring.files import read_text

    text = read_text(path, "--input")
    lines = [line for line in text.splitlines() if line.strip()]
    prompts = ([prompt_of(line, row, path, chat) for row, line in enumerate(lines)]
               if path.endswith(".jsonl") else lines)
    if not prompts:
        raise LlmkitError(f"--input {path} holds no prompts")
    return prompts


def prompt_of(line: str, row: int, path: str, chat: bool) -> Any:
    """One .jsonl row's prompt: its `prompt` text or, with `chat`, its `messages` (checked);
    a row that has neither is named by its row in the file (the first is row 0)."""
    from llmkit.tasks.chat import check

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        record = err
    if chat and isinstance(record, dict) and "messages" in record:
        try:
            check(record["messages"], row)
        except LlmkitError as err:
            raise LlmkitError(f"--input {path}: {err}") from None
        return record["messages"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return record["prompt"]
    found = (f"not JSON ({record.msg})" if isinstance(record, json.JSONDecodeError)
             else f"{line.strip()[:60]}")
    raise LlmkitError(f"--input {path}: row {row} is {found}; every line must be a JSON object "
                      f"with a 'prompt' field{' (or messages)' if chat else ''} holding text")


def templated(tokenizer: Any, prompt: str | list[dict[str, Any]], system: str | None = None
              ) -> str:
    """A conversation in the tokenizer's chat template, with the generation prompt after it:
    the prompt as one user turn (after the system message, if any), or a whole conversation."""
    from llmkit.tasks.chat import check, render

    if not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("--chat: this tokenizer has no chat template: give one with "
                          "--chat-template FILE (a Jinja template)")
    if isinstance(prompt, list):
        check(prompt, 0)
        messages = prompt
    else:
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    return render(tokenizer, messages, prompt=True)


def load_chat(model: str, base_model: str | None = None, chat_template: str | None = None
              ) -> tuple[Any, Any]:
    """A causal model for a conversation (`llmkit chat`) and its tokenizer, with a chat
    template: its own or the --chat-template file's."""
    from llmkit.inference.exported import load_generator
    from llmkit.tasks.chat import use_template

    net, tokenizer = load_generator(model, base_model)
    if net.config.is_encoder_decoder:
        raise LlmkitError(f"{model} is a sequence-to-sequence model ({net.config.model_type}): "
                          "chat needs a causal language model (llmkit generate takes this one)")
    use_template(tokenizer, chat_template, required=True)
    return net, tokenizer


def chat_prompt(model: Any, tokenizer: Any, messages: list[dict[str, Any]],
                max_new_tokens: int) -> tuple[str, int]:
    """A conversation that ends with a user turn, in the chat template with the generation
    prompt after it, and how many of its messages were left out: the oldest turns after the
    system message, a user turn and what follows it at a time, while the prompt leaves less
    than --max-new-tokens (at most half the context) for the reply. The last user turn stays."""
    from llmkit.tasks.task import context_size

    context = context_size(model.config, tokenizer)
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = messages[len(head):], 0
    while True:
        text = templated(tokenizer, head + turns)
        later = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        if context is None or not later or len(tokenizer(
                text, add_special_tokens=False)["input_ids"]) + min(
                max_new_tokens, context // 2) <= context:
            return text, dropped
        turns, dropped = turns[later[0]:], dropped + later[0]


def cut(text: str, stop: tuple[str, ...]) -> str:
    """Text up to the first stop string (the stop string itself left out)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def generate(model: Any, tokenizer: Any, prompts: list[str], settings: GenerationSettings,
             batch_size: int = 16, streamer: Any = None, on_batch: Any = None,
             templated: bool = False, stopping: Any = None) -> list[dict[str, Any]]:
    """Generate for every prompt; records come back in prompt order with token counts.
    `stopping`: a StoppingCriteriaList added to the model's own (serve's rows whose client left)."""
    import torch
    from transformers import set_seed

    if settings.seed is not None:
        set_seed(settings.seed)
    kwargs = decoding(model, tokenizer, settings, templated)
    n = settings.num_return_sequences
    beams = kwargs.get("num_beams") or model.generation_config.num_beams or 1
    if n > 1 and not kwargs["do_sample"] and n > beams:
        raise LlmkitError(f"--num-return-sequences {n} needs --sample, or --num-beams {n} or "
                          "more: greedy decoding finds one sequence")
    encoded, context = fit_context(start_empty(tokenizer(
        prompts, add_special_tokens=not templated)["input_ids"], model, tokenizer),
        model.config, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    records: list[dict[str, Any]] = [{} for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]},
                                  return_tensors="pt").to(model.device)
            try:
                out = model.generate(**batch, **room_left(kwargs, batch["input_ids"].shape[1],
                                                          context, model.config),
                                     streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                                     stopping_criteria=stopping)
            except ValueError as err:  # settings that transformers finds contradictory
                raise LlmkitError(f"generation settings: {str(err).splitlines()[0]}") from err
            new = out if model.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(chunk):
                texts, counts = [], []
                for seq in new[row * n:(row + 1) * n].tolist():
                    counts.append(new_token_count(seq, tokenizer, kwargs.get(
                        "eos_token_id", model.generation_config.eos_token_id)))
                    texts.append(cut(tokenizer.decode(seq, skip_special_tokens=True),
                                     settings.stop))
                records[i] = {"prompt": prompts[i], "output": texts[0] if n == 1 else texts,
                              "prompt_tokens": len(encoded[i]), "new_tokens": sum(counts)}
            if on_batch:
                on_batch(len(chunk), sum(records[i]["new_tokens"] for i in chunk))
    return records


def start_empty(encoded: list[list[int]], model: Any, tokenizer: Any) -> list[list[int]]:
    """Empty prompts start from the beginning-of-sequence token, as transformers'
    text-generation pipeline starts them (generate() without input_ids)."""
    if all(encoded):
        return encoded
    bos = model.generation_config.bos_token_id
    bos = tokenizer.bos_token_id if bos is None else bos
    if bos is None:
        raise LlmkitError("an empty prompt starts from the beginning-of-sequence token (as "
                          "transformers' text-generation pipeline does), and this model has "
                          "none: give the prompt some text")
    return [ids or [bos] for ids in encoded]


def decoding(model: Any, tokenizer: Any, settings: GenerationSettings, templated: bool
             ) -> dict[str, Any]:
    """model.generate's keyword arguments for these settings."""
    kwargs = settings.kwargs()
    if model.device.type == "cpu" and model.generation_config.cache_implementation is None:
        # keys and values written into preallocated tensors: the default cache concatenates
        # (reallocates) them in every layer at every step, which costs the CPU a page fault per
        # new allocation (first call 31% slower, later ones 5%: benchmarks/RESULTS.md)
        kwargs["cache_implementation"] = "static"
    if settings.stop:
        kwargs |= {"stop_strings": list(settings.stop), "tokenizer": tokenizer}
    if templated:  # a reply ends with the template's end of turn
        from llmkit.tasks.chat import end_of_turn

        ends, turn_end = model.generation_config.eos_token_id, end_of_turn(tokenizer)
        ends = ends if isinstance(ends, list) else [] if ends is None else [ends]
        if turn_end is not None and turn_end not in ends:
            kwargs["eos_token_id"] = [*ends, turn_end]
    return kwargs


def fit_context(encoded: list[list[int]], config: Any, tokenizer: Any
                ) -> tuple[list[list[int]], int | None]:
    """Prompts within the model's context (learned positions fail past it): a decoder's cut
    from the left to leave room for one new token, an encoder's cut at the end, with a warning
    saying how many; and that context (None: no limit)."""
    from llmkit.tasks.task import context_size

    context = context_size(config, tokenizer)
    if context is None:
        return encoded, None
    room = context if config.is_encoder_decoder else context - 1
    long = sum(len(ids) > room for ids in encoded)
    if long:
        side = "end" if config.is_encoder_decoder else "start"
        log.warning("%d of %d prompts are longer than the model's context of %d tokens: cut "
                    "at the %s", long, len(encoded), context, side)
    return [ids[:room] if config.is_encoder_decoder else ids[-room:] for ids in encoded], context


def room_left(kwargs: dict[str, Any], prompt: int, context: int | None, config: Any
              ) -> dict[str, Any]:
    """max_new_tokens cut to what the context leaves after a batch's `prompt` tokens."""
    used = 0 if config.is_encoder_decoder else prompt
    if context is None or kwargs["max_new_tokens"] + used <= context:
        return kwargs
    from llmkit.tasks.task import warn_once

    warn_once(config, "--max-new-tokens %d runs past the model's context of %d tokens: "
              "generation stops at its end", kwargs["max_new_tokens"], context)
    return {**kwargs, "max_new_tokens": context - used}


def new_token_count(seq: list[int], tokenizer: Any, ends: Any = None) -> int:
    """Generated tokens up to and including the first end (`ends`: the decoding's eos ids, with
    a chat's end of turn; and the tokenizer's), without padding after a row stopped early."""
    pad, ends = tokenizer.pad_token_id, {tokenizer.eos_token_id, *(
        ends if isinstance(ends, list) else [ends])}
    start = 1 if seq and seq[0] == pad and pad not in ends else 0  # a decoder's start token
    end = next((i + 1 for i in range(start, len(seq)) if seq[i] in ends), len(seq))
    while end == len(seq) and end > start and seq[end - 1] == pad:  # no end token: unpadded
        end, seq = end - 1, seq[:-1]
    return end - start
