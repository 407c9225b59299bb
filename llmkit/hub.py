"""Where checkpoints and datasets come from: a local folder or the Hugging Face Hub, reachable or
not, with errors that say what to do (and the base model an adapter run names); the libraries
kept quiet while they load, and peft where adapters need it."""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmkit.errors import LlmkitError

ADAPTER_CONFIG = "adapter_config.json"


@cache
def hub_offline() -> bool:
    """True when the Hub cannot be reached; then the libraries are told so before they retry.

    Without this, every Hub lookup on an air-gapped machine spends ~25 s in retries before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        go_offline()
        return True
    return False


def go_offline() -> None:
    """The libraries read HF_HUB_OFFLINE when imported: set the variable and their copies."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix != ""


def offline_hint(what: str, name: str, option: str) -> str:
    return (f"{what} {name!r} is not a local path and the Hugging Face Hub cannot be reached "
            f"(this machine is offline, and it is not in the local cache); point {option} at a "
            f"local {'folder saved with save_pretrained' if option == '--model' else 'file'} "
            "instead")


def check_model_source(name: str, option: str = "--model") -> None:
    """Fail early, in one line, on a model (or --tokenizer) that is neither a folder nor a Hub
    id; a model folder needs its config.json."""
    path = Path(name).expanduser()
    if path.is_dir():
        if option == "--model" and not (path / "config.json").is_file():
            raise LlmkitError(f"{name} is not a model checkpoint: it has no config.json; "
                              "point --model at a folder written by save_pretrained or a Hub id")
        return
    if path.exists():
        raise LlmkitError(f"{option} {name} is a file; give the folder that holds "
                          f"{'config.json and the weights' if option == '--model' else 'it'}")
    if looks_like_path(name):
        raise LlmkitError(f"{option} {name}: no such "
                          f"{'checkpoint folder' if option == '--model' else 'folder'}")
    hub_offline()


def is_adapter_run(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def base_of(run: str | Path, base_model: str | None) -> str:
    """The base model of an adapter run: --base-model, else the one it was trained from."""
    if base_model:
        if looks_like_path(base_model) and not is_local(base_model):
            raise LlmkitError(f"--base-model {base_model}: no such checkpoint folder")
        return base_model
    saved = json.loads((Path(run) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = str(saved.get("base_model_name_or_path") or "")
    if not base or (looks_like_path(base) and not is_local(base)):
        raise LlmkitError(f"{run} is an adapter run whose base model {base or '(unnamed)'} "
                          "cannot be found; pass --base-model with its folder or Hub id")
    return base


def peft_module() -> Any:
    try:
        import peft
    except ImportError as err:
        raise LlmkitError("--lora needs the peft library: pip install peft") from err
    return peft


def quiet_libraries() -> None:
    """Our progress bar and log lines replace the libraries' own bars and load reports."""
    import sys

    import transformers

    # datasets (0.5 s and ~150 MB with pandas and pyarrow) is imported only by the commands
    # that read data; it reads this variable when it is
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()
    # peft calls transformers APIs that transformers has deprecated: nothing for users to change
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*v6")
    transformers.utils.logging.set_verbosity_error()
    # "Removed shared tensor lm_head.weight while saving" at every checkpoint of a model with
    # tied embeddings: expected, and resuming restores the tie (also when called as a library)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def weights_identity(name: str) -> tuple[str, ...]:
    """What identifies a checkpoint's weights in a cache key: a local folder's weight files
    with their sizes and change times (weights saved again are new), else the Hub id."""
    folder = Path(name)
    if not folder.is_dir():
        return (name,)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")
                   or p.name.startswith("adapter_"))
    return (str(folder.resolve()), *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                      for p in files))
