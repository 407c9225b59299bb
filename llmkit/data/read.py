"""Raw splits from local files, folders or the Hub, read through `datasets`, with column
checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.data.files import (
    COMPRESSIONS,
    FORMATS,
    Reading,
    file_type,
    folder_splits,
    json_rows,
    read_text,
    saved_dataset,
    split_key,
    tsv_options,
)
from llmkit.errors import LlmkitError
from llmkit.hub import hub_offline, looks_like_path, offline_hint

if TYPE_CHECKING:
    from datasets import Dataset

    from llmkit.config.schema import DataConfig

log = logging.getLogger("llmkit")


def _load_file(path: Path, option: str, how: Reading) -> Dataset:
    """One file, read by its name (or --format) and --encoding; JSON rows under a top-level
    key with --json-field."""
    import datasets

    suffix, compression = file_type(path, how.fmt)
    nested = json_rows(path, suffix, compression, how, option)
    if nested is not None:
        return nested
    if suffix not in FORMATS:
        raise LlmkitError(f"{option} {path}: unknown format {suffix or '(no extension)'!r}; "
                          f"use one of {', '.join(FORMATS)} (compressed: "
                          f"{', '.join(COMPRESSIONS)}), a saved dataset folder, or name it with "
                          "--format")
    builder, kwargs = FORMATS[suffix]
    if how.field and builder != "json":
        raise LlmkitError(f"{option} {path}: --json-field {how.field} reads JSON files, and this "
                          f"one is {suffix}")
    if compression and builder in ("parquet", "arrow"):
        raise LlmkitError(f"{option} {path}: {suffix} files are read uncompressed; decompress it")
    expected = None
    if suffix == ".tsv":
        kwargs, expected = tsv_options(path, compression, how.encoding, option)
    elif builder in ("csv", "json", "text"):
        read_text(path, compression, how.encoding, option, keep=False)  # decodes, or says so
    if builder in ("csv", "json", "text"):
        kwargs = {**kwargs, "encoding": how.encoding}
    kwargs = {**kwargs, "sample_by": how.sample_by} if builder == "text" else {
        **kwargs, **({"field": how.field} if how.field else {})}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        if how.field and isinstance(cause, KeyError):
            raise LlmkitError(f"{option} {path}: no top-level key {how.field!r} (--json-field)"
                              ) from err
        raise LlmkitError(f"{option} {path}: could not be read as {suffix}: "
                          f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                          ) from err
    if expected is not None and len(rows) != expected:  # never a row split wrongly
        raise LlmkitError(f"{option} {path}: {len(rows)} rows read where the file holds "
                          f"{expected} records; check its quotes, tabs and line breaks")
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


def _load_paths(paths: list[str], source: str, option: str, how: Reading) -> Dataset:
    """Files, in the order given, as one split."""
    import datasets

    parts = [_load_file(Path(p), option, how) for p in paths]
    odd = next((i for i, part in enumerate(parts)
                if set(part.column_names) != set(parts[0].column_names)), None)
    if odd is not None:
        raise LlmkitError(f"{option} {source}: the {len(paths)} files do not hold the same "
                          f"columns ({paths[0]}: {', '.join(parts[0].column_names)}; "
                          f"{paths[odd]}: {', '.join(parts[odd].column_names)})")
    if len(parts) == 1:
        return parts[0]
    try:
        rows = datasets.concatenate_datasets(parts)
    except ValueError as err:  # the same columns, of types that do not agree
        raise LlmkitError(f"{option} {source}: the files do not agree on the columns' "
                          f"types ({str(err).splitlines()[0][:120]})") from err
    log.info("%s %s: %d rows from %d files", option, source, len(rows), len(paths))
    return rows


def _load_folder(path: Path, split: str, option: str, how: Reading) -> Dataset:
    """A `save_to_disk` folder (a Dataset, or a DatasetDict's split), or the split's files of
    a folder as load_dataset(folder) finds them (train.csv, dev.tsv, test-00001.jsonl ...)."""
    splits = {} if (path / "state.json").is_file() else folder_splits(path, how.fmt)
    key = split_key(list(splits), split)
    if saved_dataset(path):
        import datasets

        try:
            rows = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as err:  # a damaged or partial folder
            raise LlmkitError(f"{option} {path}: could not be read as a saved dataset "
                              f"({str(err).splitlines()[0][:120] if str(err) else err!r})"
                              ) from err
        if isinstance(rows, datasets.DatasetDict):
            if key is None:
                hint = f"; name one with {option}-split" if option in (
                    "--train", "--validation") else ""
                raise LlmkitError(f"{option} {path}: a saved dataset whose splits are "
                                  f"{', '.join(splits)}, none of them {split}{hint}")
            rows = rows[key]
        log.info("%s %s: %s of a saved dataset", option, path,
                 f"the {key} split" if key else "the rows")
        return rows.with_format(None)
    if not splits:
        raise LlmkitError(f"{option} {path} is a folder; give a file ({', '.join(FORMATS)}), a "
                          "folder saved by datasets' save_to_disk, or one with train/validation/"
                          "test files")
    if key is None:
        raise LlmkitError(f"{option} {path}: the folder holds no {split} files (its splits: "
                          f"{', '.join(splits)}; datasets names a split's files train.csv, "
                          "validation.csv, test.csv ...)")
    log.info("%s %s: the %s split, %s", option, path, key,
             ", ".join(Path(p).name for p in splits[key][:5]))
    return _load_paths(splits[key], str(path), option, how)


def load_split(source: str, split: str, dataset_config: str | None, option: str,
               sample_by: str = "line", fmt: str | None = None, field: str | None = None,
               encoding: str = "utf-8") -> Dataset:
    """One split from a local file (by its name under a compression suffix, or `fmt`; a .txt
    file gives a `text` row per line, paragraph or document), the files a glob matches, a
    folder (saved dataset, or split files), or a Hub dataset id."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError as err:
        raise LlmkitError(f"--encoding {encoding}: no such text encoding (utf-8, latin-1, "
                          "cp1252, utf-16 ...)") from err
    how = Reading(sample_by, fmt, field, encoding)
    path = Path(source).expanduser()
    if any(c in source for c in "*?[") and not path.exists():
        import glob

        paths = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
        if not paths:
            raise LlmkitError(f"{option} {source}: no file matches")
        rows = _load_paths(paths, source, option, how)
    elif path.is_file():
        rows = _load_file(path, option, how)
    elif path.is_dir():
        rows = _load_folder(path, split, option, how)
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


def reading(data: DataConfig) -> tuple[str, str | None, str | None, str]:
    """load_split's file settings from a task's data settings: sample_by, format,
    json_field, encoding."""
    return getattr(data, "sample_by", "line"), data.format, data.json_field, data.encoding


def load_splits(data: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Training and evaluation rows; without --validation, the validation split of a --train
    folder, else a seeded slice of train."""
    how = reading(data)
    train = load_split(data.train, data.train_split, data.dataset_config, "--train", *how)
    folder = Path(data.train).expanduser()
    own = (not data.validation and folder.is_dir() and not (folder / "state.json").is_file()
           and split_key(list(folder_splits(folder, data.format)), data.validation_split)
           is not None)
    if data.validation or own:
        valid = load_split(data.validation or data.train, data.validation_split,
                           data.dataset_config, "--validation", *how)
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
