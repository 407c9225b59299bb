"""Text generation for `llmkit generate` (and generative evaluation): the model's own `generate`,
KV cache on, prompts batched by length, under `torch.inference_mode`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; greedy unless sampling is asked for."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int | None = None  # None: the model's generation config (a seq2seq run's)
    repetition_penalty: float | None = None
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        chosen = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "num_beams": self.num_beams, "num_return_sequences": self.num_return_sequences,
                  "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                  "repetition_penalty": self.repetition_penalty, "use_cache": True}
        return {k: v for k, v in chosen.items() if v is not None}


def load_generator(name: str) -> tuple[Any, Any]:
    """A causal or seq2seq model and its tokenizer (left padding for decoder-only batches)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from llmkit.hub import load_pretrained
    from llmkit.report import quiet_libraries
    from llmkit.tasks import fits, get_task, task_names

    quiet_libraries()
    config = load_pretrained(AutoConfig, name)
    if config.is_encoder_decoder:
        auto: Any = AutoModelForSeq2SeqLM
    elif fits(get_task("generate"), config):
        auto = AutoModelForCausalLM
    else:
        usable = [t for t in task_names() if fits(get_task(t), config)]
        raise LlmkitError(f"{name} is a {config.model_type} encoder: it cannot generate text; "
                          f"it fits: {', '.join(usable) or 'no llmkit task'}")
    tokenizer = load_pretrained(AutoTokenizer, name)
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the checkpoint's own dtype on a GPU; fp32 on CPUs, where bf16 matmuls are slow
    model = load_pretrained(auto, name, dtype="auto" if device.type == "cuda" else torch.float32)
    return model.to(device).eval(), tokenizer


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl rows with a `prompt` field."""
    from llmkit.evaluate import read_text

    text = read_text(path, "--input")
    if path.endswith(".jsonl"):
        try:
            prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LlmkitError(f"--input {path}: every line must be a JSON object with a "
                              f"'prompt' field ({err})") from err
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LlmkitError(f"--input {path} holds no prompts")
    return prompts


def chat(tokenizer: Any, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("--chat: this tokenizer has no chat template")
    return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True))


def cut(text: str, stop: tuple[str, ...]) -> str:
    """Text up to the first stop string (the stop string itself left out)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def generate(model: Any, tokenizer: Any, prompts: list[str], settings: GenerationSettings,
             batch_size: int = 16, streamer: Any = None, on_batch: Any = None,
             templated: bool = False) -> list[dict[str, Any]]:
    """Generate for every prompt; records come back in prompt order with token counts."""
    import torch
    from transformers import set_seed

    if settings.seed is not None:
        set_seed(settings.seed)
    kwargs = settings.kwargs()
    if model.device.type == "cpu" and model.generation_config.cache_implementation is None:
        # keys and values written into preallocated tensors: the default cache concatenates
        # (reallocates) them in every layer at every step, which costs the CPU a page fault per
        # new allocation (first call 31% slower, later ones 5%: benchmarks/RESULTS.md)
        kwargs["cache_implementation"] = "static"
    if settings.stop:
        kwargs |= {"stop_strings": list(settings.stop), "tokenizer": tokenizer}
    encoded = tokenizer(prompts, add_special_tokens=not templated)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    records: list[dict[str, Any]] = [{} for _ in prompts]
    n = settings.num_return_sequences
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]},
                                  return_tensors="pt").to(model.device)
            out = model.generate(**batch, **kwargs, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out if model.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(chunk):
                texts, counts = [], []
                for seq in new[row * n:(row + 1) * n].tolist():
                    counts.append(new_token_count(seq, tokenizer))
                    texts.append(cut(tokenizer.decode(seq, skip_special_tokens=True),
                                     settings.stop))
                records[i] = {"prompt": prompts[i], "output": texts[0] if n == 1 else texts,
                              "prompt_tokens": len(encoded[i]), "new_tokens": sum(counts)}
            if on_batch:
                on_batch(len(chunk), sum(records[i]["new_tokens"] for i in chunk))
    return records


def new_token_count(seq: list[int], tokenizer: Any) -> int:
    """Generated tokens up to and including the first end-of-sequence (padding excluded)."""
    start = 1 if seq and seq[0] == getattr(tokenizer, "pad_token_id", None) and \
        tokenizer.pad_token_id != tokenizer.eos_token_id else 0
    for index in range(start, len(seq)):
        if seq[index] == tokenizer.eos_token_id:
            return index + 1 - start
    return len(seq) - start
