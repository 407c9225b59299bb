"""Local files as rows: their type (by name under a compression suffix, or --format), their
encoding, TSV with or without CSV quoting, JSON layouts, and folders (a `save_to_disk`
dataset, or train/validation/test files as `load_dataset(folder)` finds them)."""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("llmkit")


# Text files keep every byte: no "NA"/"null" strings turned into missing values, and TSV quotes
# read as CSV quoting only in files that quote as csv writers do (see tsv_options).
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # what datasets' builders open
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}


@dataclass(frozen=True)
class Reading:
    """How local files are read: --format, --json-field, --encoding, and the rows of a .txt
    file (a line, a paragraph or the whole document each)."""

    sample_by: str = "line"
    fmt: str | None = None
    field: str | None = None
    encoding: str = "utf-8"


def file_type(path: Path, fmt: str | None) -> tuple[str, str | None]:
    """A file's type suffix and compression suffix: --format, else its name under a
    compression suffix (rows.jsonl.gz -> .jsonl, .gz)."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if fmt:
        return "." + {"text": "txt"}.get(fmt, fmt), compression
    return Path(name[:-len(compression)] if compression else name).suffix, compression


def open_text(path: Path, compression: str | None, encoding: str) -> IO[str]:
    if compression:
        import importlib

        opener = importlib.import_module(COMPRESSIONS[compression]).open
        return opener(path, "rt", encoding=encoding)
    return path.open(encoding=encoding)


def not_text(path: Path, option: str, encoding: str, err: UnicodeDecodeError) -> LlmkitError:
    other = "latin-1" if encoding.replace("_", "-").lower() in ("utf-8", "utf8") else "utf-8"
    return LlmkitError(f"{option} {path} is not {encoding} text (it holds byte "
                       f"0x{err.object[err.start]:02x}); pass --encoding {other} (or the file's "
                       "encoding)")


def read_text(path: Path, compression: str | None, encoding: str, option: str,
              keep: bool = True) -> str:
    """The whole text (or, with keep False, a check that it decodes), with a decode error
    as one line that names --encoding."""
    try:
        with open_text(path, compression, encoding) as f:
            if keep:
                return f.read()
            while f.read(1 << 20):
                pass
            return ""
    except UnicodeDecodeError as err:
        raise not_text(path, option, encoding, err) from err
    except (OSError, EOFError) as err:  # a damaged archive
        raise LlmkitError(f"{option} {path}: could not be read ({err})") from err


# A TSV field as csv writers (pandas' to_csv, csv.writer) write it: in quotes with quotes
# doubled (then it may hold tabs and line breaks), or without any quote, tab or line break
FIELD = re.compile(r'(?:"[^"]*(?:""[^"]*)*"|[^\t\r\n"]*)(\t|\r?\n|\Z)')


def quoted_records(text: str) -> int | None:
    """Records after the header of a TSV that quotes as csv writers do (every record with the
    header's fields; blank lines skipped), or None when a field breaks those rules."""
    records, fields, width, pos = 0, 0, None, 0
    while True:
        found = FIELD.match(text, pos)
        if found is None:
            return None
        fields, pos = fields + 1, found.end()
        if found.group(1) == "\t":
            continue
        value = found.group(0)[:len(found.group(0)) - len(found.group(1))]
        if fields > 1 or value.strip():  # not a blank line (pandas skips those)
            if width is None:
                width = fields
            elif fields != width:
                return None
            else:
                records += 1
        fields = 0
        if not found.group(1):  # the end of the text
            break
    return records


def tsv_options(path: Path, compression: str | None, encoding: str, option: str
                ) -> tuple[dict[str, Any], int | None]:
    """Reader options of a TSV, and the rows it must give: CSV quoting rules for a file that
    quotes (pandas' to_csv(sep="\\t") with texts holding quotes, tabs or line breaks), else
    every character as is (texts in the wild hold raw quotes), each line checked to hold the
    header's fields, so no row split wrongly is read."""
    text = read_text(path, compression, encoding, option)
    if text.startswith('"') or '\t"' in text or '\n"' in text:  # a field opens with a quote
        records = quoted_records(text)
        if records is not None:
            log.info("%s %s: fields in quotes; read with CSV quoting rules", option, path)
            return {"delimiter": "\t", "keep_default_na": False}, records
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1)  # pandas skips blank
             if line.strip() or "\t" in line]                      # lines, not empty fields
    width = lines[0][1].count("\t") + 1 if lines else 0
    odd = next(((n, line) for n, line in lines if line.count("\t") + 1 != width), None)
    if odd is not None:
        raise LlmkitError(
            f"{option} {path}: line {odd[0]} holds {odd[1].count(chr(9)) + 1} tab-separated "
            f"field(s) where the header holds {width} ({odd[1][:50]!r}); a text with a tab or "
            "line break in it must be in quotes, with every quote in the file doubled, as "
            "pandas' to_csv(sep='\\t') writes it")
    return FORMATS[".tsv"][1], len(lines) - 1


def json_document(f: IO[str]) -> Any:
    """The value of a file holding one JSON document, None for JSON Lines (a whole value on
    the first line, more lines after it) and for what does not parse."""
    import json

    first = f.readline()
    try:
        value = json.loads(first)  # a whole value on the first line: one document, or
        return None if any(line.strip() for line in f) else value  # JSON Lines
    except json.JSONDecodeError:
        f.seek(0)
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None  # let the json builder say what is wrong


def json_rows(path: Path, suffix: str, compression: str | None, how: Reading, option: str
              ) -> Dataset | None:
    """Rows of a JSON document that `datasets`' json builder does not read by itself: the
    official nested SQuAD layout (data -> paragraphs -> qas, flattened to the Hub layout: id,
    title, context, question, answers{text, answer_start}) and flat rows under a top-level
    `data` key (run_qa.py's files). None for JSON Lines (whatever the extension) and the rest;
    with --json-field, a document that is a list is refused."""
    from datasets import Dataset

    if suffix != ".json":
        return None
    try:
        with open_text(path, compression, how.encoding) as f:
            start = f.read(4096).lstrip()[:1]
            if how.field and start == "[":
                raise LlmkitError(f"{option} {path} holds a JSON list, not an object with keys:"
                                  f" drop --json-field {how.field}")
            f.seek(0)
            data = json_document(f) if start == "{" and not how.field else None
    except UnicodeDecodeError as err:
        raise not_text(path, option, how.encoding, err) from err
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


def split_key(names: list[str], split: str) -> str | None:
    """Which of a folder's splits `split` names: itself, or a name datasets reads as it."""
    for name in (split, *SPLIT_NAMES.get(split, ())):
        if name in names:
            return name
    return None


def saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def folder_splits(path: Path, fmt: str | None = None) -> dict[str, list[str]]:
    """A folder's splits: a saved DatasetDict's (no files), else its train/validation/test
    files (of a type llmkit reads, by name or --format) as load_dataset(folder) finds them."""
    import json

    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return {name: [] for name in names}
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.exceptions import DataFilesNotFoundError

    try:
        patterns = get_data_patterns(str(path))
        found = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except (DataFilesNotFoundError, FileNotFoundError):
        return {}
    known = {str(name): sorted(f for f in files if file_type(Path(f), fmt)[0] in FORMATS)
             for name, files in found.items()}
    return {name: files for name, files in known.items() if files}
