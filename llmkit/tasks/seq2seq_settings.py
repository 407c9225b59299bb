"""The settings of translate and summarize (one seq2seq task reading different columns), the
columns summarize finds in the data, and the source prefix they imply for T5 checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llmkit.config.schema import BadRows, DataConfig, setting

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PretrainedConfig

log = logging.getLogger("llmkit")


Kind = Literal["translate", "summarize"]
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish",
             "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ru": "Russian",
             "zh": "Chinese", "ja": "Japanese", "cs": "Czech", "fi": "Finnish", "tr": "Turkish"}


@dataclass(frozen=True)
class Seq2SeqData(DataConfig):
    """Source and target lengths, and evaluation by generation."""

    max_length: int = setting(256, "Truncate sources to this many tokens; batches are padded "
                              "only to their longest row.", "--max-source-length", minimum=1)
    max_target_length: int = setting(128, "Truncate targets to this many tokens (counted in "
                                     "the log).", minimum=1)
    source_prefix: str | None = setting(None, "Text put before every source; T5 checkpoints "
                                        "default to theirs ('summarize: ').")
    empty_rows: BadRows = setting("fail", "fail or skip rows with an empty source or target.")
    num_beams: int | None = setting(None, "Beams when evaluating by generation (default: the "
                                    "checkpoint's, else 1).", minimum=1)
    max_new_tokens: int | None = setting(None, "Tokens generated at most per evaluation row "
                                         "(default: --max-target-length).", minimum=1)


@dataclass(frozen=True)
class TranslateData(Seq2SeqData):
    """Which languages, and where the pairs are."""

    source_lang: str | None = setting(None, "Source language key of the data (en; mBART/NLLB "
                                      "codes such as en_XX work too).")
    target_lang: str | None = setting(None, "Target language key of the data.")
    translation_column: str = setting("translation", "Column of {lang: text} pairs; '' reads "
                                      "one column per language.")


@dataclass(frozen=True)
class SummarizeData(Seq2SeqData):
    """Which columns hold the documents and their summaries."""

    text_column: str = setting("text", "Column with the document.")
    summary_column: str = setting("summary", "Column with the summary.")


def source_prefix(kind: Kind, data: Any, config: PretrainedConfig) -> str:
    """The prefix T5 checkpoints were trained with, unless data.source_prefix says otherwise."""
    if data.source_prefix is not None:
        return data.source_prefix
    if config.model_type != "t5":
        return ""
    if kind == "summarize":
        return "summarize: "
    source, target = (LANGUAGES.get(str(lang), str(lang)) for lang in (data.source_lang,
                                                                        data.target_lang))
    return f"translate {source} to {target}: "


def detect(kind: Kind, rows: Dataset, data: Any) -> Any:
    """Summarize with the default columns absent: as run_summarization.py, the first text
    column is the document and the next the summary (an id column passed over); said in the
    log. Columns named on purpose (not the defaults) are kept."""
    from dataclasses import replace

    names = rows.column_names
    if kind != "summarize" or (data.text_column in names and data.summary_column in names):
        return data
    free = [n for n in names if n not in (data.text_column, data.summary_column)
            and n.lower() not in ("id", "idx") and not n.lower().endswith(("_id", " id"))
            and getattr(rows.features[n], "dtype", None) in ("string", "large_string")]
    found = {}
    for key, default in (("text_column", "text"), ("summary_column", "summary")):
        if getattr(data, key) not in names and getattr(data, key) == default and free:
            found[key] = free.pop(0)
    if found:
        data = replace(data, **found)
        log.info("document column: %s, summary column: %s (--text-column / --summary-column)",
                 data.text_column, data.summary_column)
    return data
