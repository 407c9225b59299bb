"""A worker of `llmkit sweep --trials-in-parallel` (started by `sweep.workers`, not by hand):
one more process on the study, its log lines on stdout for the sweep that started it, and its
failure as one last line."""

from __future__ import annotations

import json
import logging
import os
import sys

from llmkit.errors import one_line
from llmkit.sweep.study import sweep
from llmkit.sweep.workers import LINE


def work(spec: str) -> int:
    """The sweep `spec` names (sweep's arguments as JSON), one trial at a time."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LINE))
    logger = logging.getLogger("llmkit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sweep(**json.loads(spec))
    except Exception as err:  # the worker's error boundary: one line for the sweep that waits
        if os.environ.get("LLMKIT_DEBUG") == "1":
            raise
        logger.critical("%s", one_line(err, ["sweep"])[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(work(sys.argv[1]))
