"""Checkpoints from a local folder or the Hugging Face Hub, with errors that say what to do."""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmkit.errors import LlmkitError


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


def load_pretrained(auto_class: Any, name: str, option: str = "--model", **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(name)` with the Hub's failures turned into one clear line."""
    check_model_source(name, option)
    import pickle

    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as err:
        if not is_local(name) and hub_offline():
            raise LlmkitError(offline_hint(option.strip("-"), name, option)) from err
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

