"""Reading rows: every format, no silently lost rows, clear column errors; the batch sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.config.schema import DataConfig
from llmkit.data.batches import LengthGroupedBatches
from llmkit.data.read import check_columns, load_split, load_splits
from llmkit.errors import LlmkitError

ROWS = [{"text": 'he said "hi', "label": "a"}, {"text": "NA", "label": "b"},
        {"text": "third, with comma", "label": "a"}]


def write(path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".tsv":
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(ROWS).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".json", ".parquet"])
def test_every_format_keeps_every_row_verbatim(tmp_path: Path, suffix: str) -> None:
    rows = load_split(str(write(tmp_path / f"d{suffix}")), "train", None, "--train")
    assert rows["text"] == [r["text"] for r in ROWS]  # raw quotes and "NA" survive
    assert rows["label"] == [r["label"] for r in ROWS]


def test_tsv_with_raw_quotes_loses_no_rows(tmp_path: Path) -> None:
    # A quote-aware reader merges these rows (the banking77 trap in ../shared/data).
    lines = ['what does "pending" mean\ta', 'my card "was\tb', 'still "pending\ta', "ok\tb"]
    path = tmp_path / "q.tsv"
    path.write_text("text\tlabel\n" + "\n".join(lines) + "\n")
    rows = load_split(str(path), "train", None, "--train")
    assert len(rows) == 4 and rows["text"][1] == 'my card "was'


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LlmkitError, match="no such file"):
        load_split(str(tmp_path / "missing.csv"), "train", None, "--train")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(LlmkitError, match="unknown format '.xlsx'; use one of .csv, .tsv"):
        load_split(str(tmp_path / "x.xlsx"), "train", None, "--train")
    (tmp_path / "empty.tsv").write_text("text\tlabel\n")
    with pytest.raises(LlmkitError, match="empty"):
        load_split(str(tmp_path / "empty.tsv"), "train", None, "--train")
    (tmp_path / "sheets").mkdir()
    (tmp_path / "sheets" / "x.xlsx").write_text("x")
    with pytest.raises(LlmkitError, match="is a folder; give a file"):
        load_split(str(tmp_path / "sheets"), "train", None, "--train")


def test_missing_column_names_the_columns_that_exist(tmp_path: Path) -> None:
    rows = load_split(str(write(tmp_path / "d.tsv")), "train", None, "--train")
    with pytest.raises(LlmkitError, match="no column 'sentence'; the columns are 'text', 'label'"):
        check_columns(rows, ["sentence", "label"], "--train")


def test_tab_separated_csv_says_to_rename_it(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\n", encoding="utf-8")
    rows = load_split(str(path), "train", None, "--train")
    with pytest.raises(LlmkitError, match=r"the file is tab-separated: give it a \.tsv extension"):
        check_columns(rows, ["text", "label"], "--train")


def test_offline_hub_dataset_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmkitError, match="offline"):
        load_split("someone/some-dataset-that-is-not-cached", "train", None, "--train")


def test_held_out_slice_is_seeded_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n"
                            for i in range(50)))
    cfg = DataConfig(train=str(path), validation_fraction=0.2)
    train, valid = load_splits(cfg, seed=3)
    again, valid_again = load_splits(cfg, seed=3)
    assert len(valid) == 10 and len(train) == 40
    assert valid["text"] == valid_again["text"]
    assert not set(valid["text"]) & set(train["text"])


def test_length_grouped_batches_cover_each_row_once_and_group_lengths() -> None:
    import random

    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=0)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and len(batches) == len(sampler) == 63
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # random batches would pad to about 1.9x
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    plain = LengthGroupedBatches(lengths, 16, seed=0, group=False)
    assert sorted(i for b in plain for i in b) == list(range(1000))


def test_length_grouping_of_a_small_set_still_draws_new_batches_each_epoch() -> None:
    """38 batches are fewer than one 50-batch mega-batch: sorting the whole set would give the
    same batches (one length each) every epoch. At least 4 mega-batches keep them drawn anew."""
    lengths = list(range(1200))  # every length once: a whole-set sort repeats batches exactly

    def pairs(epoch: int) -> set[tuple[int, int]]:
        sampler = LengthGroupedBatches(lengths, 32, seed=0)
        sampler.set_epoch(epoch)
        return {(a, b) for batch in sampler for a in batch for b in batch if a < b}

    first, second = pairs(0), pairs(1)
    assert len(first & second) < 0.3 * len(first)


def test_grouping_inside_batches_keeps_the_random_batches_in_sorted_micro_batches() -> None:
    """Seq2seq's grouping: each batch holds the rows of the ungrouped sampler's batch, longest
    first, and is collated as 4 micro-batches, each padded to its own longest row, with shares
    of the loss by target tokens that add up to 1; 1,000 rows in batches of 16 end with 8."""
    import random

    import torch

    from llmkit.config.schema import TrainConfig
    from llmkit.data.batches import MicroBatches, micro_batches

    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    plain = list(LengthGroupedBatches(lengths, 16, seed=0, group=False))
    inside = LengthGroupedBatches(lengths, 16, seed=0, group=False, split=4)
    sorted_batches = list(inside)
    assert len(sorted_batches) == len(inside) == len(plain) == 63
    assert [sorted(b) for b in sorted_batches] == [sorted(b) for b in plain]
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
               for b in sorted_batches)

    def collate(rows: list[dict]) -> dict:
        width = max(r["n"] for r in rows)
        return {"labels": torch.tensor([[1] * r["n"] + [-100] * (width - r["n"]) for r in rows])}

    def row(n: int) -> dict:
        return {"n": n, "input_ids": [0] * n}

    micro = [MicroBatches(collate, 4, 500)([row(lengths[i]) for i in b])
             for b in sorted_batches]
    assert all(1 < len(m["micro_batches"]) <= 4 for m in micro)
    assert sum(len(p["labels"]) for p in micro[-1]["micro_batches"]) == 8
    first = micro[0]
    tokens = [int((p["labels"] != -100).sum()) for p in first["micro_batches"]]
    assert [float(s) for s in first["shares"]] == pytest.approx([t / sum(tokens) for t in tokens])
    padded = sum(p["labels"].numel() for m in micro for p in m["micro_batches"])
    assert padded < 0.7 * sum(len(b) * max(lengths[i] for i in b) for b in plain)
    assert MicroBatches(collate, 1)([row(3)])["labels"].shape == (1, 3)  # split 1: as is
    assert MicroBatches(collate, 4, 500)([row(3)] * 16)["labels"].shape == (16, 3)  # at once
    for size, split in ((32, 4), (64, 4), (16, 2), (12, 1), (8, 1)):
        assert micro_batches(TrainConfig(batch_size=size), True) == split
    assert micro_batches(TrainConfig(batch_size=32), False) == 1
    assert micro_batches(TrainConfig(batch_size=32, group_by_length=False), True) == 1


def test_micro_batches_are_cut_where_they_run_the_fewest_tokens() -> None:
    """`cuts` finds the cheapest cuts of a sorted batch (each part's rows times its longest
    row, plus the overhead of one more part) among those of at most `most` parts, none over
    `1/most` of the batch at the data's longest row: against every possible cut of small
    batches; short rows of equal length run at once, a long row alone."""
    import itertools
    import random

    from llmkit.data.batches import cuts

    def cost(parts: list[tuple[int, int]], lengths: list[int], overhead: int) -> int:
        return sum(overhead + (end - start) * lengths[start] for start, end in parts)

    rng = random.Random(0)
    for _ in range(200):
        n, most, overhead = rng.randint(1, 9), rng.randint(1, 4), rng.choice([0, 8, 32, 200])
        lengths = sorted((rng.randint(1, 60) for _ in range(n)), reverse=True)
        longest = max(lengths) + rng.choice([0, 0, 40])
        cap = -(-n // most) * longest
        found = cuts(lengths, most, overhead, longest)
        assert found[0][0] == 0 and found[-1][1] == n and len(found) <= most
        assert all(a[1] == b[0] for a, b in itertools.pairwise(found))
        assert all((end - start) * lengths[start] <= cap for start, end in found)
        best = min(cost(list(itertools.pairwise((0, *inner, n))), lengths, overhead)
                   for k in range(most) for inner in itertools.combinations(range(1, n), k)
                   if all((e - s) * lengths[s] <= cap
                          for s, e in itertools.pairwise((0, *inner, n))))
        assert cost(found, lengths, overhead) == best
    assert cuts([10] * 32, 4, 32, 128) == [(0, 32)]
    assert cuts([120] + [10] * 31, 4, 32, 128) == [(0, 1), (1, 32)]
    assert cuts([], 4, 32) == []


def test_json_files_read_whatever_their_layout(tmp_path: Path) -> None:
    """JSON Lines named .json (transformers' wmt16/xsum fixtures), run_qa.py's rows under a
    top-level "data" key, and the official nested SQuAD file minified on one line."""
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_split(str(lines), "train", None, "--train")["text"] == [r["text"] for r in ROWS]
    flat = tmp_path / "flat.json"
    qa = [{"id": "1", "context": "Ann wrote it.", "question": "Who wrote it?",
           "answers": {"text": ["Ann"], "answer_start": [0]}}]
    flat.write_text(json.dumps({"version": "1", "data": qa}, indent=2))
    assert load_split(str(flat), "train", None, "--train")["answers"] == [qa[0]["answers"]]
    nested = tmp_path / "squad.json"
    nested.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": "Ann wrote it.", "qas": [{"id": "1", "question": "Who?", "answers": [
            {"text": "Ann", "answer_start": 0}]}]}]}]}))
    rows = load_split(str(nested), "train", None, "--train")
    assert rows[0]["answers"] == {"text": ["Ann"], "answer_start": [0]}


def test_json_field_reads_rows_under_any_top_level_key(tmp_path: Path) -> None:
    doc = tmp_path / "export.json"
    doc.write_text(json.dumps({"meta": {"n": 2}, "examples": ROWS}, indent=1))
    rows = load_split(str(doc), "train", None, "--train", field="examples")
    assert rows["text"] == [r["text"] for r in ROWS]
    train, valid = load_splits(DataConfig(train=str(doc), validation=str(doc),
                                          json_field="examples"), 0)
    assert len(train) == len(valid) == len(ROWS)
    with pytest.raises(LlmkitError, match="no top-level key 'rows' \\(--json-field\\)"):
        load_split(str(doc), "train", None, "--train", field="rows")
    table = tmp_path / "t.csv"
    table.write_text("text,label\nhi,1\n")
    with pytest.raises(LlmkitError, match="--json-field examples reads JSON files"):
        load_split(str(table), "train", None, "--train", field="examples")


def test_a_glob_reads_every_file_it_matches_and_format_names_a_file_type(tmp_path: Path) -> None:
    import json

    from llmkit.data.read import load_split

    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(
            json.dumps({"text": f"row {i}.{j}", "label": j % 2}) + "\n" for j in range(4)))
    rows = load_split(str(tmp_path / "part-*.jsonl"), "train", None, "--train")
    assert len(rows) == 12 and rows[0]["text"] == "row 0.0" and rows[11]["text"] == "row 2.3"
    with pytest.raises(LlmkitError, match=r"--train .*nothing-\*.csv: no file matches"):
        load_split(str(tmp_path / "nothing-*.csv"), "train", None, "--train")
    (tmp_path / "part-9.jsonl").write_text(json.dumps({"sentence": "x", "label": 0}) + "\n")
    with pytest.raises(LlmkitError, match="the 4 files do not hold the same columns"):
        load_split(str(tmp_path / "part-*.jsonl"), "train", None, "--train")
    plain = tmp_path / "reviews.data"
    plain.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\n")
    with pytest.raises(LlmkitError, match="unknown format '.data'; .* or name it with --format"):
        load_split(str(plain), "train", None, "--train")
    assert load_split(str(plain), "train", None, "--train", fmt="tsv")["label"] == ["pos", "neg"]


def test_tsv_that_quotes_is_read_with_csv_rules_and_no_row_is_split_wrongly(tmp_path: Path
                                                                            ) -> None:
    """pandas' to_csv(sep="\\t") quotes a text holding a quote, tab or line break and doubles its
    quotes: such a file is read as pandas and csv read it back. A file that does not quote keeps
    its raw quotes (test above), and a line whose fields do not match the header is refused."""
    import pandas as pd

    frame = pd.DataFrame({"text": ['the "café" moment', "two\nlines", "a\ttab", "plain"],
                          "label": ["a", "b", "a", "b"]})
    for name, part in (("newlines.tsv", frame), ("quotes.tsv", frame.iloc[[0, 3]])):
        part.to_csv(tmp_path / name, sep="\t", index=False)
        rows = load_split(str(tmp_path / name), "train", None, "--train")
        assert rows.to_list() == part.to_dict("records")
    broken = tmp_path / "broken.tsv"
    broken.write_text('text\tlabel\n"two\nlines\ta\nok\tb\n')  # a quote never closed
    with pytest.raises(LlmkitError, match=r"line 2 holds 1 tab-separated field\(s\) where the "
                       "header holds 2 .* must be in quotes"):
        load_split(str(broken), "train", None, "--train")


def test_compressed_files_saved_datasets_split_folders_and_arrow(tmp_path: Path) -> None:
    """What datasets reads: .jsonl.gz/.json.gz/.csv.gz/.tsv.gz (the type under the compression
    suffix), a save_to_disk folder (Dataset or DatasetDict: its splits are train/validation/
    test), a folder of train.*/dev.* files as load_dataset(folder) finds them, an .arrow file,
    and --format text."""
    import gzip

    import pandas as pd
    from datasets import Dataset, DatasetDict

    frame = pd.DataFrame(ROWS)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    frame.to_csv(tmp_path / "d.csv.gz", index=False)
    frame.to_csv(tmp_path / "d.tsv.gz", sep="\t", index=False)
    frame.to_json(tmp_path / "d.json.gz", orient="records", lines=True)
    for name in ("d.jsonl.gz", "d.csv.gz", "d.tsv.gz", "d.json.gz"):
        assert load_split(str(tmp_path / name), "train", None, "--train").to_list() == ROWS
    whole = Dataset.from_list(ROWS)
    whole.save_to_disk(str(tmp_path / "saved"))
    assert load_split(str(tmp_path / "saved"), "train", None, "--train").to_list() == ROWS
    DatasetDict({"train": whole.select([0, 1]), "validation": whole.select([2])}).save_to_disk(
        str(tmp_path / "dict"))
    train, valid = load_splits(DataConfig(train=str(tmp_path / "dict")), 0)
    assert train.to_list() == ROWS[:2] and valid.to_list() == ROWS[2:]
    with pytest.raises(LlmkitError, match="splits are train, validation, none of them test"):
        load_split(str(tmp_path / "dict"), "test", None, "--test")
    (tmp_path / "folder").mkdir()
    frame.iloc[:2].to_csv(tmp_path / "folder" / "train.csv", index=False)
    frame.iloc[2:].to_csv(tmp_path / "folder" / "dev.csv", index=False)
    train, valid = load_splits(DataConfig(train=str(tmp_path / "folder")), 0)
    assert train.to_list() == ROWS[:2] and valid.to_list() == ROWS[2:]
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_split(str(arrow), "train", None, "--train").to_list() == ROWS
    (tmp_path / "lines.data").write_text("one\ntwo\n")
    assert load_split(str(tmp_path / "lines.data"), "train", None, "--train",
                      fmt="text")["text"] == ["one", "two"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmkitError, match="is a folder; give a file"):
        load_split(str(tmp_path / "empty"), "train", None, "--train")


def test_encoding_reads_latin1_and_a_decode_error_names_the_option(tmp_path: Path) -> None:
    from dataclasses import dataclass

    import pandas as pd

    rows = [{"text": "crème brûlée", "label": "a"}, {"text": "déjà vu", "label": "b"}]
    pd.DataFrame(rows).to_csv(tmp_path / "l.csv", index=False, encoding="latin-1")
    (tmp_path / "l.txt").write_bytes("crème\nbrûlée\n".encode("latin-1"))
    for name in ("l.csv", "l.txt"):
        with pytest.raises(LlmkitError, match=f"--train .*{name} is not utf-8 text .*; pass "
                           r"--encoding latin-1 \(or the file's encoding\)"):
            load_split(str(tmp_path / name), "train", None, "--train")
    assert load_split(str(tmp_path / "l.csv"), "train", None, "--train",
                      encoding="latin-1").to_list() == rows
    with pytest.raises(LlmkitError, match="--encoding klingon: no such text encoding"):
        load_split(str(tmp_path / "l.csv"), "train", None, "--train", encoding="klingon")

    @dataclass(frozen=True)
    class WithEncoding(DataConfig):  # the data settings' encoding field, read by load_splits
        encoding: str = "utf-8"

    train, valid = load_splits(WithEncoding(train=str(tmp_path / "l.csv"), validation=str(
        tmp_path / "l.csv"), encoding="latin-1"), 0)
    assert train.to_list() == valid.to_list() == rows
