"""Training data in one format: a folder of items and interactions, read, validated and written here.

A data folder holds one items file and one interactions file, each as Parquet,
CSV or JSON Lines (README, "Training on your own data"):

  items.parquet | items.csv | items.jsonl                 item_id, title, description, category, brand,
                                                          price, tags, uploaded_at (the item-uploads fields)
  interactions.parquet | interactions.csv | interactions.jsonl     user_id, item_id, action, occurred_at

Every row is checked with the service's own event rules (coldstart.events): a
row is valid exactly when the same item upload or user action would be valid
on the topics (`uploaded_at` may be left out: training needs no upload time).
On top of them: an item_id appears once in items; an interaction names an item
of items and is not an exact repeat of an earlier one (the worker counts such a
replay once). The first bad row stops the read with an error naming the file
and the line (Parquet: the row); `skip_bad_rows` skips such rows and counts
them instead.

The result is an `Interactions`: items in file order, item text as the worker
builds it (encoders.text.item_text of the same fields), and each user's
positive actions (click, like, share, purchase) in time order, ties in file
order; `skip` actions are valid and enter no sequence, as in the worker.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coldstart.events import EPOCH, POSITIVE_ACTIONS, InvalidEvent, action_fields, item_fields, json_object
from encoders.text import item_text

FORMATS = ("parquet", "csv", "jsonl")
ITEM_FIELDS = ("item_id", "title", "description", "category", "brand", "price", "tags", "uploaded_at")
INTERACTION_FIELDS = ("user_id", "item_id", "action", "occurred_at")
REQUIRED = {"items": ("item_id", "title"), "interactions": INTERACTION_FIELDS}
TIME_FIELDS = ("uploaded_at", "occurred_at")
SHOWN_REASONS = 5  # bad rows named in a report; the rest are counted

# The Parquet types written (and the natural ones to write); the reader also takes other
# spellings the rules accept: strings or epoch seconds for times, for instance.
SCHEMAS = {
    "items": pa.schema([
        ("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
        ("category", pa.string()), ("brand", pa.string()), ("price", pa.float64()),
        ("tags", pa.list_(pa.string())), ("uploaded_at", pa.timestamp("us", tz="UTC")),
    ]),
    "interactions": pa.schema([
        ("user_id", pa.string()), ("item_id", pa.string()), ("action", pa.string()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
    ]),
}


@dataclass
class Interactions:
    """A data set: items with their text, and every user's time-ordered item sequence."""

    name: str
    item_ids: list[str]  # item index → the data set's item id
    item_texts: list[str]  # item index → the text the frozen encoder reads
    user_ids: list[str]  # user index → the data set's user id
    sequences: list[np.ndarray]  # user index → item indices (int64), oldest first

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


def build_interactions(name, item_ids, item_texts, users, items, times) -> Interactions:
    """Order each user's interactions by time (stable: ties keep file order); users sorted by id."""
    item_index = {item: i for i, item in enumerate(item_ids)}
    frame = pd.DataFrame({"user": list(users), "item": [item_index[i] for i in items], "time": list(times)})
    frame = frame.sort_values(["user", "time"], kind="stable")
    user_ids, sequences = [], []
    for user, group in frame.groupby("user", sort=True):
        user_ids.append(str(user))
        sequences.append(group["item"].to_numpy(dtype=np.int64))
    return Interactions(name, list(item_ids), list(item_texts), user_ids, sequences)


class DataError(ValueError):
    """A data folder that cannot be read; the message says which file and why."""


class BadRow(DataError):
    """A row that breaks the rules: names the file, the line (Parquet: the row) and the reason."""

    def __init__(self, path: Path, where: str, reason: str):
        super().__init__(f"{path}, {where}: {reason}")
        self.path, self.where, self.reason = path, where, reason


@dataclass
class FileReport:
    """What was read from one file: rows, and the bad rows skipped (where, reason)."""

    path: Path
    rows: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path.name}: {_count(self.rows, 'row')}"
        if self.bad:
            shown = "; ".join(f"{where}: {reason}" for where, reason in self.bad[:SHOWN_REASONS])
            more = f"; … {len(self.bad) - SHOWN_REASONS} more" if len(self.bad) > SHOWN_REASONS else ""
            text += f", {_count(len(self.bad), 'bad row')} skipped ({shown}{more})"
        return text


@dataclass
class ReadReport:
    items: FileReport
    interactions: FileReport
    skips: int = 0  # valid `skip` actions: in no sequence

    @property
    def bad_rows(self) -> int:
        return len(self.items.bad) + len(self.interactions.bad)

    def summary(self) -> str:
        skips = _count(self.skips, "skip action")
        return f"{self.items.summary()}; {self.interactions.summary()}; {skips} (in no sequence)"

    def as_dict(self) -> dict:
        files = {kind: {"path": str(report.path), "rows": report.rows, "bad_rows": len(report.bad),
                        "bad": [f"{where}: {reason}" for where, reason in report.bad[:SHOWN_REASONS]]}
                 for kind, report in (("items", self.items), ("interactions", self.interactions))}
        return {**files, "skip_actions": self.skips}


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'s' if number != 1 else ''}"


def data_files(folder: Path) -> tuple[Path, Path]:
    """The items and interactions files of a data folder; DataError if one is missing or ambiguous."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (a data folder holds items.* and interactions.*)")
    found = []
    for kind in ("items", "interactions"):
        candidates = [folder / f"{kind}.{fmt}" for fmt in FORMATS if (folder / f"{kind}.{fmt}").exists()]
        if not candidates:
            raise DataError(f"{folder} has no {kind} file ({', '.join(f'{kind}.{f}' for f in FORMATS)})")
        if len(candidates) > 1:
            raise DataError(f"{folder} holds {' and '.join(p.name for p in candidates)}: keep one")
        found.append(candidates[0])
    return found[0], found[1]


def read_data(folder: Path, skip_bad_rows: bool = False, name: str = "") -> tuple[Interactions, ReadReport]:
    """The data set in a data folder (named after the folder), and what was read.

    BadRow at the first bad row, or with skip_bad_rows, those rows left out and listed in the report.
    DataError for a folder without its files, a file without a required column, or no interaction left.
    """
    items_path, interactions_path = data_files(folder)
    report = ReadReport(FileReport(items_path), FileReport(interactions_path))

    def bad(file_report: FileReport, where: str, reason: str) -> None:
        if not skip_bad_rows:
            raise BadRow(file_report.path, where, reason)
        file_report.bad.append((where, reason))

    item_ids, texts, first_seen = [], [], {}
    for where, data in _rows(items_path, "items"):
        report.items.rows += 1
        try:
            item = item_fields(_check_parsed(data), time_required=False)
        except InvalidEvent as reason:
            bad(report.items, where, str(reason))
            continue
        if item["deleted"]:
            bad(report.items, where, "a removal (deleted: true) is not an item: leave removed items out")
        elif item["item_id"] in first_seen:
            bad(report.items, where, f"item_id {item['item_id']!r} is already on {first_seen[item['item_id']]}")
        else:
            first_seen[item["item_id"]] = where
            item_ids.append(item["item_id"])
            # The worker's text of the same fields (streams.items), so a trained tower sees what it will serve.
            texts.append(item_text(item["title"], item["description"], item["category"], item["brand"],
                                   item["tags"], item["price"]))

    users, items, times, seen = [], [], [], {}
    for where, data in _rows(interactions_path, "interactions"):
        report.interactions.rows += 1
        try:
            action = action_fields(_check_parsed(data))
        except InvalidEvent as reason:
            bad(report.interactions, where, str(reason))
            continue
        key = (action["user_id"], action["item_id"], action["action"], action["occurred_at"])
        if action["item_id"] not in first_seen:
            bad(report.interactions, where, f"item_id {action['item_id']!r} is not in {items_path.name}")
        elif key in seen:
            bad(report.interactions, where, f"the same action as on {seen[key]}")
        else:
            seen[key] = where
            if action["action"] not in POSITIVE_ACTIONS:
                report.skips += 1
                continue
            users.append(action["user_id"])
            items.append(action["item_id"])
            times.append((action["occurred_at"] - EPOCH) // timedelta(microseconds=1))  # exact: ties stay ties
    if not users:
        positive = ", ".join(sorted(POSITIVE_ACTIONS))
        raise DataError(f"{interactions_path}: no positive interaction ({positive}) to train on")
    return build_interactions(name or Path(folder).resolve().name, item_ids, texts, users, items, times), report


class _Unparsed:
    """A row that is not even a record (a JSON Lines line that is not a JSON object)."""

    def __init__(self, reason: InvalidEvent):
        self.reason = reason


def _check_parsed(data) -> dict:
    if isinstance(data, _Unparsed):
        raise data.reason
    return data


def _rows(path: Path, kind: str) -> Iterator[tuple[str, dict | _Unparsed]]:
    """(where, the row as an event's fields) for every data row of a file: "line N" (the file's line, 1-based)
    for CSV and JSON Lines, "row N" (1-based) for Parquet."""
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[path.suffix]
    try:
        yield from reader(path, kind)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _jsonl_rows(path: Path, kind: str):
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield f"line {number}", json_object(line)
                except InvalidEvent as reason:
                    yield f"line {number}", _Unparsed(reason)


def _csv_rows(path: Path, kind: str):
    with open(path, newline="", encoding="utf-8-sig") as text:
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty (the first line names the columns: {', '.join(_fields(kind))})")
        _check_columns(path, kind, header)
        line = reader.line_num  # the last line of the previous record: a quoted field may span lines
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not any(cells):
                continue
            if len(cells) != len(header):
                yield f"line {start}", _Unparsed(InvalidEvent(f"{len(cells)} cells for {len(header)} columns"))
                continue
            yield f"line {start}", {name: _csv_cell(name, cell) for name, cell in zip(header, cells)
                                    if cell != "" or name not in NOT_TEXT}


NOT_TEXT = ("price", "tags", "deleted", *TIME_FIELDS)  # an empty CSV cell of these is no value; of text, ""


def _csv_cell(name: str, cell: str):
    """A CSV cell as the JSON value it stands for: price a number, tags a JSON array, a time in epoch seconds
    when numeric, deleted a boolean; a cell that is none of these stays a string (and the rules say why)."""
    try:
        if name == "price":
            return float(cell)
        if name in TIME_FIELDS:
            return int(cell) if cell.lstrip("-").isdigit() else float(cell)
        if name == "tags":
            return json.loads(cell)
    except ValueError:
        return cell
    if name == "deleted" and cell.lower() in ("true", "false"):
        return cell.lower() == "true"
    return cell


def _parquet_rows(path: Path, kind: str):
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a Parquet file ({err})") from None
    columns = file.schema_arrow.names
    _check_columns(path, kind, columns)
    wanted = [c for c in columns if c in _fields(kind) or c == "deleted"]
    number = 0
    for batch in file.iter_batches(batch_size=65_536, columns=wanted):
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", {name: _parquet_cell(value) for name, value in row.items() if value is not None}


def _parquet_cell(value):
    """A typed Parquet value as the JSON value the rules read: a timestamp as ISO-8601 (a naive one without
    its time zone, which the rules refuse)."""
    if isinstance(value, datetime):  # pandas' Timestamp is one too
        return value.isoformat()
    return value


def _fields(kind: str) -> tuple[str, ...]:
    return ITEM_FIELDS if kind == "items" else INTERACTION_FIELDS


def _check_columns(path: Path, kind: str, columns) -> None:
    missing = [c for c in REQUIRED[kind] if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(map(str, columns)) or 'none'})")


# ---------------------------------------------------------------------------
# Writing


def write_data(folder: Path, items: list[dict], interactions: list[dict], fmt: str = "parquet",
               metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write a data folder: items (dicts of ITEM_FIELDS; missing ones empty) and interactions (dicts of
    INTERACTION_FIELDS, times as datetimes), in row order. Each file is replaced atomically; DataError if
    the folder holds a file of another format that the reader would also find. `metadata`: Parquet only,
    stored in both files' schema."""
    assert fmt in FORMATS, fmt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("items", "interactions"):
        others = [folder / f"{kind}.{f}" for f in FORMATS if f != fmt and (folder / f"{kind}.{f}").exists()]
        if others:
            raise DataError(f"{folder} already holds {others[0].name}: remove it to write {kind}.{fmt}")
    written = []
    for kind, rows in (("items", items), ("interactions", interactions)):
        path = folder / f"{kind}.{fmt}"
        tmp = folder / f".{path.name}.tmp"
        columns = {name: [row.get(name) for row in rows] for name in _fields(kind)}
        if fmt == "parquet":
            table = pa.table(columns, schema=SCHEMAS[kind])
            if metadata:
                table = table.replace_schema_metadata(metadata)
            pq.write_table(table, tmp)
        elif fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(_fields(kind))
                writer.writerows([_csv_value(v) for v in values] for values in zip(*columns.values()))
        else:
            with open(tmp, "w", encoding="utf-8") as out:
                for values in zip(*columns.values()):
                    out.write(json.dumps({name: _json_value(v) for name, v in zip(columns, values) if v is not None},
                                         ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written[0], written[1]


def _json_value(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False) if value else ""
    return str(value) if not isinstance(value, float) else repr(value)
