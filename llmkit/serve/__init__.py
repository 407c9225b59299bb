"""`llmkit serve`: a run directory behind the APIs clients already speak (OpenAI's completions
and chat completions for generation runs, Text Embeddings Inference's /predict for classifiers,
/v1/qa for extractive QA), concurrent requests batched into one forward or generate call."""

from llmkit.serve.limits import Limits
from llmkit.serve.server import run_server

__all__ = ["Limits", "run_server"]
