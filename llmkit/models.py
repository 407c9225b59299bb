"""Every checkpoint load (plain, an adapter run merged into its base, a 4-bit base, or new weights
from a config; for training or inference) with its tokenizer. Only here is `from_pretrained`."""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from llmkit import hub
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llmkit.config.schema import DataConfig, RunConfig
    from llmkit.tasks.task import Task

log = logging.getLogger("llmkit")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# heads that start untrained: peft trains them in full (modules_to_save), so they are no target
HEADS = ("classifier", "score", "qa_outputs")
SCORING_HEADS = ("ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")


def load_pretrained(auto_class: Any, name: str, option: str = "--model", **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(name)` with the Hub's failures turned into one clear line."""
    hub.check_model_source(name, option)
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as err:
        if not hub.is_local(name) and hub.hub_offline():
            raise LlmkitError(hub.offline_hint(option.strip("-"), name, option)) from err
        if (Path(name) / "export.json").is_file():  # inference.exported.DONE (a layer up)
            raise LlmkitError(f"{name} is an llmkit export (ONNX): it holds no PyTorch weights "
                              "to load here; give the run directory it was exported from") from err
        raise LlmkitError(f"could not load {name!r}: {err}".replace("\n", " ")) from err
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused the file
        raise LlmkitError(f"--model {name}: its pickled weights (.bin) hold more than tensors "
                          "and were refused, as loading them could run code; if you trust the "
                          "file, convert it to safetensors where you made it") from err
    except (SafetensorError, EOFError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
            raise  # not a damaged .bin (out of memory, ...)
        reason = " ".join(str(err).split())[:200]
        raise LlmkitError(f"--model {name}: its weights cannot be read ({reason}); the file "
                          "is damaged or incomplete: save or download it again") from err


def fuse_gelu(model: Any) -> None:
    """Swap GPT-2-style tanh GELUs (gelu_new, gelu_fast: five elementwise passes) for PyTorch's
    one-kernel tanh GELU: the same function to ~2e-7, 4.5x faster forward and backward on CPU
    (GPT-2's MLP: 11% of a step). The config keeps its activation name."""
    from transformers.activations import ACT2CLS, ACT2FN

    slow = (ACT2CLS["gelu_new"], ACT2CLS["gelu_fast"])
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) in slow:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


def model_config(name: str, overrides: str | None = None) -> PretrainedConfig:
    """The checkpoint's config with --config-overrides applied (transformers'
    `update_from_string`, as run_clm.py applies them)."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, name)
    if overrides:
        overrides = ",".join("=".join(side.strip() for side in part.split("=", 1))
                             for part in overrides.split(","))  # 'n_layer = 1' as 'n_layer=1'
        if any("=" not in part for part in overrides.split(",")):
            raise LlmkitError(f"--config-overrides {overrides!r}: expected key=value pairs "
                              "separated by commas, e.g. n_layer=4,n_embd=256")
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as err:
            raise LlmkitError(f"--config-overrides {overrides!r}: {err} (the keys of "
                              f"{config.model_type}'s config.json can be changed)") from None
    return config


def load_tokenizer(source: str, option: str = "--model", padding_side: str | None = None) -> Any:
    """A checkpoint's tokenizer, with a pad token (GPT-2 has none: its end of sequence pads)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, source, option)
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # transformers 5 builds an
        # empty tokenizer when the files are missing
        raise LlmkitError(f"{source} has no tokenizer files (tokenizer.json, vocab files); save "
                          "the tokenizer into the same folder with tokenizer.save_pretrained")
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def inference_device() -> torch.device:
    """Where prediction, scoring and generation run outside a training run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_generator(name: str, base_model: str | None = None) -> tuple[Any, Any]:
    """A causal or seq2seq model for generation, in eval mode on the inference device, and its
    tokenizer (left padding for decoder-only batches)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from llmkit.tasks import fits, get_task, registry

    hub.quiet_libraries()
    config = load_pretrained(AutoConfig, name)
    # a fine-tuned classifier, reward model or QA model of a decoder: its LM head is gone
    heads = [a for a in config.architectures or [] if a.endswith(SCORING_HEADS)]
    if config.is_encoder_decoder and not heads:
        auto: Any = AutoModelForSeq2SeqLM
    elif fits(get_task("generate"), config) and not heads:
        auto = AutoModelForCausalLM
    else:
        usable = [t.name for t in registry().values() if fits(t, config)]
        raise LlmkitError(f"{name} is a {heads[0] if heads else config.model_type + ' encoder'}"
                          f": it cannot generate text; it fits: {', '.join(usable) or 'none'}")
    tokenizer = load_tokenizer(name, padding_side=None if config.is_encoder_decoder else "left")
    device = inference_device()
    # the checkpoint's own dtype on a GPU; fp32 on CPUs, where bf16 matmuls are slow
    dtype = "auto" if device.type == "cuda" else torch.float32
    if hub.is_adapter_run(name):  # merged into its base, for plain generation
        model = load_merged(name, auto, base_model, dtype=dtype)
    else:
        model = load_pretrained(auto, name, config=config, dtype=dtype)
    return model.to(device).eval(), tokenizer


def load_model(task: Task, name: str, data: DataConfig, trained: bool = False,
               quantized: bool = False, base_model: str | None = None,
               run: RunConfig | None = None, config: PretrainedConfig | None = None,
               **config_kwargs: Any) -> tuple[Any, Any]:
    """Model and tokenizer of a checkpoint for `task`, fitted to the data settings; a missing
    head is added (and logged) to train, and refused when the model must be `trained`
    (prediction and evaluation would answer from random weights). An adapter run comes back
    merged into its base (`base_model` overrides the one it names); `quantized`: 4-bit base.
    A training `run` may name another tokenizer, config overrides, or random weights; its
    `config`, read before the data (model_config), gets the task's `config_kwargs` here."""
    from llmkit.tasks import auto_class, check_pairing

    config = config or model_config(name, run.config_overrides if run else None)
    for key, value in config_kwargs.items():  # as from_pretrained(**kwargs) sets them
        setattr(config, key, value)
    check_pairing(task, config, name)
    source = (run.tokenizer if run else None) or name
    tokenizer = load_tokenizer(source, "--tokenizer" if source != name else "--model")
    try:
        model, new = load_weights(auto_class(task), name, config, quantized, base_model, run)
    except (ValueError, RuntimeError, KeyError, ZeroDivisionError) as err:  # the layers check
        if not (run and run.config_overrides):  # their config when they are built (or fail on it)
            raise
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        raise LlmkitError(f"--config-overrides {run.config_overrides!r}: the model cannot be "
                          f"built so ({kind}{str(err).splitlines()[0]})") from None
    finish(model, tokenizer, task, data, name, new, trained)
    return model, tokenizer


def load_weights(auto: Any, name: str, config: PretrainedConfig, quantized: bool,
                 base_model: str | None, run: RunConfig | None) -> tuple[Any, list[str]]:
    """The model's weights: random (--from-scratch), an adapter run merged, or the checkpoint's;
    and the names of the weights that start untrained (a new head)."""
    # fp32 weights whatever the checkpoint holds (transformers 5 keeps a bf16 checkpoint in
    # bf16): the optimizer needs fp32 master weights; --mixed-precision computes in bf16/fp16
    weights = four_bit() if quantized else {"dtype": torch.float32}
    if run and run.from_scratch:
        model = auto.from_config(config, dtype=torch.float32)
        log.info("--from-scratch: %s from %s's config with random weights (%s parameters)",
                 type(model).__name__, name, f"{model.num_parameters():,}")
        return model, []
    if hub.is_adapter_run(name):  # its heads come with the adapter; peft froze the base
        return load_merged(name, auto, base_model, **weights).requires_grad_(True), []
    model, info = load_pretrained(auto, name, config=config, **weights,
                                  ignore_mismatched_sizes=True, output_loading_info=True)
    check_reshaped(info["mismatched_keys"], run)
    return model, sorted(info["missing_keys"]) + sorted(k[0] if isinstance(k, tuple) else k
                                                        for k in info["mismatched_keys"])


def check_reshaped(mismatched: list[Any], run: RunConfig | None) -> None:
    """--config-overrides that change the shape of pretrained weights would leave them random
    without a word: refused (task heads are new anyway)."""
    reshaped = body(mismatched)
    if run and run.config_overrides and reshaped:
        raise LlmkitError(f"--config-overrides {run.config_overrides!r} changes the shape of "
                          f"pretrained weights ({', '.join(reshaped[:3])}): add --from-scratch "
                          "to train a new model of that shape, or leave those keys alone")


def body(keys: list[Any]) -> list[str]:
    """The weight names (mismatched ones come as tuples) outside the heads, which start new."""
    return sorted(k for k in (k[0] if isinstance(k, tuple) else k for k in keys)
                  if not set(k.split(".")) & {*HEADS, "lm_head"})


def finish(model: Any, tokenizer: Any, task: Task, data: DataConfig, name: str, new: list[str],
           trained: bool) -> None:
    """Refuse or log new head weights; fit the embeddings and pad id to the tokenizer."""
    if new and trained:
        raise LlmkitError(f"{name} has no trained {task.name} head ({', '.join(new[:3])} "
                          f"{'...' if len(new) > 3 else 'are'} missing): fine-tune it first "
                          f"(llmkit finetune {task.name}) and give the run directory")
    if new:
        log.info("%s has no trained %s head: new weights (%s) start from random values",
                 name, task.name, ", ".join(new[:6]) + (" ..." if len(new) > 6 else ""))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # a --tokenizer with more tokens (run_clm.py does the same)
        log.info("the tokenizer has %d tokens, the embeddings %d rows: resizing them",
                 len(tokenizer), rows)
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fuse_gelu(model)
    if task.prepare is not None:
        task.prepare(model, tokenizer, data)


def four_bit() -> dict[str, Any]:
    """from_pretrained arguments of a 4-bit (NF4) frozen base, QLoRA's; one line where the
    machine cannot run it."""
    if not torch.cuda.is_available():
        raise LlmkitError("--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit layers run "
                          "there) and this machine has none; train LoRA on the full-precision "
                          "base instead (drop --load-in-4bit)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LlmkitError("--load-in-4bit needs the bitsandbytes library: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # heads stay whole: a new one trains in full, and the output layer keeps its precision
        # (transformers' own guess misses a classifier whose last parameter is its bias)
        llm_int8_skip_modules=[*HEADS, "lm_head", "embed_out"]), "dtype": compute,
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def load_merged(run: str | Path, auto_class: Any, base_model: str | None = None,
                **kwargs: Any) -> Any:
    """An adapter run as a plain transformers model: its base (with the run's config: labels,
    generation settings) plus the adapter, merged."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, str(run))
    if "quantization_config" not in kwargs:
        unquantized(config)  # a QLoRA run's adapter merges into the full-precision base
    name = hub.base_of(run, base_model)
    kind = load_pretrained(AutoConfig, name).model_type
    if kind != config.model_type:
        raise LlmkitError(f"{name} is a {kind} model and the adapter of {run} was trained on a "
                          f"{config.model_type} one: give its base model with --base-model")
    base, info = load_pretrained(auto_class, name, config=config, ignore_mismatched_sizes=True,
                                 output_loading_info=True, **kwargs)
    check_base(run, name, base, info)
    model = hub.peft_module().PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    if (Path(run) / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(run))
    return model


def check_base(run: str | Path, name: str, model: Any, info: dict[str, Any]) -> None:
    """Another base would merge silently into random or cut weights: it must hold every weight
    the adapter changes, in the run's shapes, and no more layers (the heads come with it)."""
    if not (Path(run) / ADAPTER_WEIGHTS).is_file():
        raise LlmkitError(f"{run} has no {ADAPTER_WEIGHTS}: give the run directory llmkit wrote")
    with safe_open(str(Path(run) / ADAPTER_WEIGHTS), "pt") as adapter:
        changed = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"
                   for k in adapter.keys() if ".lora_" in k}
    prefix = f"{model.base_model_prefix}."
    stacks = "|".join(re.escape(n.removeprefix(prefix)) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.ModuleList))  # layers, numbered
    wrong = [*body(info["mismatched_keys"]), *sorted(changed & set(info["missing_keys"])),
             *sorted(k for k in info["unexpected_keys"] if stacks and re.match(
                 rf"(?:{stacks})\.\d+\.", k.removeprefix(prefix)))]
    if wrong:
        raise LlmkitError(f"{name} does not fit the adapter of {run}, which was trained on a base"
                          f" of another shape ({', '.join(wrong[:3])}{' ...' * (len(wrong) > 3)}"
                          "): give its base model with --base-model")


def unquantized(config: Any) -> Any:
    """A config without a QLoRA base's 4-bit settings: the adapter merges at full precision."""
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(key, None)
    return config
