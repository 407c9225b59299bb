"""Raw splits from local files or the Hub, read through `datasets`, with column checks."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.hub import hub_offline, looks_like_path, offline_hint

if TYPE_CHECKING:
    from datasets import Dataset

    from llmkit.config.schema import DataConfig

log = logging.getLogger("llmkit")


# Text files keep every byte: no quote handling in TSV (texts in the wild hold raw quotes), and
# no "NA"/"null" strings turned into missing values.
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _json_rows(path: Path, suffix: str) -> Dataset | None:
    """Rows of a JSON document that `datasets`' json builder does not read by itself: the
    official nested SQuAD layout (data -> paragraphs -> qas, flattened to the Hub layout: id,
    title, context, question, answers{text, answer_start}) and flat rows under a top-level
    `data` key (run_qa.py's files). None for JSON Lines (whatever the extension) and the rest."""
    import json

    from datasets import Dataset

    if suffix != ".json":
        return None
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        if not first.lstrip().startswith("{"):
            return None
        try:
            data = json.loads(first)  # a whole value on the first line: one document, or
            if any(line.strip() for line in f):  # JSON Lines when more lines follow
                return None
        except json.JSONDecodeError:
            f.seek(0)
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                return None  # let the json builder say what is wrong
    rows = data.get("data") if isinstance(data, dict) else None
    if not (isinstance(rows, list) and rows and isinstance(rows[0], dict)):
        return None
    if "paragraphs" not in rows[0]:
        log.info("%s: reading the rows under its top-level 'data' key", path)
        return Dataset.from_list(rows)
    return Dataset.from_list([
        {"id": str(qa["id"]), "title": article.get("title", ""),
         "context": paragraph["context"], "question": qa["question"],
         "answers": {"text": [a["text"] for a in qa.get("answers", [])],
                     "answer_start": [a["answer_start"] for a in qa.get("answers", [])]}}
        for article in rows for paragraph in article["paragraphs"] for qa in paragraph["qas"]])


def _load_file(path: Path, option: str, sample_by: str, suffix: str | None = None,
               field: str | None = None) -> Dataset:
    """One file, read by its extension (or `suffix`, from --format); JSON rows under a
    top-level `field` (--json-field) when given."""
    import datasets

    suffix = suffix or path.suffix.lower()
    nested = None if field else _json_rows(path, suffix)
    if nested is not None:
        return nested

    if suffix not in FORMATS:
        raise LlmkitError(f"{option} {path}: unknown format {suffix or '(no extension)'!r}; "
                          f"use one of {', '.join(FORMATS)}, or name it with --format")
    builder, kwargs = FORMATS[suffix]
    if field and builder != "json":
        raise LlmkitError(f"{option} {path}: --json-field {field} reads JSON files, and this "
                          f"one is {suffix}")
    kwargs = {"sample_by": sample_by} if builder == "text" else {
        **kwargs, **({"field": field} if field else {})}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        if field and isinstance(cause, KeyError):
            raise LlmkitError(f"{option} {path}: no top-level key {field!r} (--json-field)"
                              ) from err
        if field and isinstance(cause, TypeError):  # a list has no keys to pick from
            raise LlmkitError(f"{option} {path} holds a JSON list, not an object with keys: "
                              f"drop --json-field {field}") from err
        raise LlmkitError(f"{option} {path}: could not be read as {suffix}: "
                          f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                          ) from err
    if suffix == ".tsv" and len(rows) != _count_lines(path) - 1:
        log.warning("%s: read %d rows from %d non-empty lines after the header; check for "
                    "stray tabs or line breaks inside texts", path, len(rows),
                    _count_lines(path) - 1)
    return rows


def _load_hub(name: str, split: str, dataset_config: str | None, option: str) -> Dataset:
    import datasets

    hub_offline()
    try:
        return datasets.load_dataset(name, dataset_config, split=split)
    except ConnectionError as err:
        raise LlmkitError(offline_hint("dataset", name, option)) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise LlmkitError(f"{option} {name}: no such local file and no such Hub dataset") from err
    except ValueError as err:
        raise LlmkitError(f"{option} {name}: {str(err).splitlines()[0]}") from err


def _load_files(pattern: str, option: str, sample_by: str, suffix: str | None,
                field: str | None = None) -> Dataset:
    """Every file a glob matches, in name order, as one split."""
    import glob

    import datasets

    paths = sorted(p for p in glob.glob(str(Path(pattern).expanduser())) if Path(p).is_file())
    if not paths:
        raise LlmkitError(f"{option} {pattern}: no file matches")
    parts = [_load_file(Path(p), option, sample_by, suffix, field) for p in paths]
    odd = next((i for i, part in enumerate(parts)
                if set(part.column_names) != set(parts[0].column_names)), None)
    if odd is not None:
        raise LlmkitError(f"{option} {pattern}: the {len(paths)} files do not hold the same "
                          f"columns ({paths[0]}: {', '.join(parts[0].column_names)}; "
                          f"{paths[odd]}: {', '.join(parts[odd].column_names)})")
    try:
        rows = datasets.concatenate_datasets(parts)
    except ValueError as err:  # the same columns, of types that do not agree
        raise LlmkitError(f"{option} {pattern}: the files do not agree on the columns' "
                          f"types ({str(err).splitlines()[0][:120]})") from err
    log.info("%s %s: %d rows from %d files", option, pattern, len(rows), len(paths))
    return rows


def load_split(source: str, split: str, dataset_config: str | None, option: str,
               sample_by: str = "line", fmt: str | None = None, field: str | None = None
               ) -> Dataset:
    """One split from a local file (by extension, or `fmt`; a .txt file gives a `text` row
    per line, paragraph or document), the files a glob matches, or a Hub dataset id."""
    path = Path(source).expanduser()
    suffix = f".{fmt}" if fmt else None
    if any(c in source for c in "*?[") and not path.exists():
        rows = _load_files(source, option, sample_by, suffix, field)
    elif path.is_file():
        rows = _load_file(path, option, sample_by, suffix, field)
    elif path.is_dir():
        raise LlmkitError(f"{option} {source} is a folder; give a file ({', '.join(FORMATS)})")
    elif path.exists():
        raise LlmkitError(f"{option} {source} is not a regular file (a pipe?); save it to a file")
    elif looks_like_path(source):
        raise LlmkitError(f"{option} {source}: no such file")
    else:
        rows = _load_hub(source, split, dataset_config, option)
    if len(rows) == 0:
        raise LlmkitError(f"{option} {source}: the split is empty")
    return rows


def check_columns(rows: Dataset, needed: list[str], option: str) -> None:
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        hint = "set the column option"
        if len(rows.column_names) == 1 and "\t" in rows.column_names[0]:
            hint = "the file is tab-separated: give it a .tsv extension"
        raise LlmkitError(f"{option}: no column {', '.join(map(repr, missing))}; the columns are "
                          f"{', '.join(map(repr, rows.column_names))} ({hint})")


def check_output_file(path: str | Path, option: str = "--output") -> None:
    """A file that can be written: checked before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise LlmkitError(f"{option} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise LlmkitError(f"{option} {path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise LlmkitError(f"{option} {path}: folder {path.parent} is not writable")


def check_text(rows: Dataset, columns: list[str]) -> None:
    """Text columns hold strings: a list, a number or an object in one is refused, with the
    first row, instead of being tokenized as something it is not."""
    for column in columns:
        feature = rows.features[column]
        if getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
            kind = getattr(feature, "dtype", None) or type(feature).__name__.lower()
            raise LlmkitError(f"column {column!r} holds {kind} values, not text (first row: "
                              f"{str(rows[0][column])[:60]!r}); give a column of strings")


def empty_rows(rows: Dataset, columns: list[str], policy: str, what: str) -> Dataset:
    """Rows whose value in one of `columns` is missing or blank: refused with a count and the
    first one (policy fail), or left out with the count in the log (skip)."""
    values = zip(*(rows[c] for c in columns), strict=True)
    bad = [i for i, row in enumerate(values)
           if any(v is None or (isinstance(v, str) and not v.strip()) for v in row)]
    if not bad:
        return rows
    if policy == "fail" or len(bad) == len(rows):
        raise LlmkitError(f"{len(bad)} of {len(rows)} rows have an empty {what} (first: "
                          f"{str(rows[bad[0]])[:80]}); fix the data or pass "
                          "-s data.empty_rows=skip to leave them out")
    log.warning("leaving out %d of %d rows with an empty %s", len(bad), len(rows), what)
    return rows.select(sorted(set(range(len(rows))) - set(bad)))


def load_splits(data: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Training and evaluation rows; without a validation set, a seeded slice of train."""
    sample_by = getattr(data, "sample_by", "line")  # a setting of the tasks that read .txt
    train = load_split(data.train, data.train_split, data.dataset_config, "--train", sample_by,
                       data.format, data.json_field)
    if data.validation:
        valid = load_split(data.validation, data.validation_split, data.dataset_config,
                           "--validation", sample_by, data.format, data.json_field)
    else:
        if len(train) < 2:
            raise LlmkitError("--train holds one row: too few to hold out a validation slice")
        parts = train.train_test_split(test_size=data.validation_fraction, seed=seed)
        train, valid = parts["train"], parts["test"]
        log.info("no --validation given: holding out %d of the training rows (seed %d)",
                 len(valid), seed)
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples:
        valid = valid.select(range(min(data.max_eval_samples, len(valid))))
    return train, valid
