"""llmkit: fine-tune and evaluate pretrained Hugging Face checkpoints.

The Python API behind the CLI; heavy libraries load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.config.schema import RunConfig
from llmkit.errors import ConfigError, LlmkitError

__all__ = ["ConfigError", "LlmkitError", "RunConfig", "__version__", "finetune", "load_config"]

if TYPE_CHECKING:
    from pathlib import Path


def load_config(task: str, recipe: str | dict[str, Any] | None = None,
                options: dict[str, Any] | None = None, overrides: list[str] | None = None
                ) -> RunConfig:
    """A task's RunConfig from a recipe, options (dotted keys) and overrides (see
    llmkit.tasks.load_config)."""
    from llmkit.tasks import load_config as resolve

    return resolve(task, recipe, options, overrides)


def finetune(cfg: RunConfig, **kwargs: Any) -> Path:
    """Fine-tune per `cfg` and return the run directory (see llmkit.run.finetune.finetune).
    Mistakes in the paths are refused before torch is imported (seconds on a busy machine)."""
    from llmkit.run.start import check_start

    check_start(cfg, kwargs.get("resume", False), kwargs.get("resume_from"),
                kwargs.get("overwrite", False))
    from llmkit.run.finetune import finetune as run

    return run(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    """`llmkit.__version__`: the installed distribution's, whose one source is pyproject.toml
    (read on first use: `llmkit --help` does not pay for the lookup)."""
    if name != "__version__":
        raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmkit")
    except PackageNotFoundError:  # the source put on sys.path without installing it
        return "0+unknown"
