"""Readers for local data files: txt, jsonl, json, csv, tsv, parquet. Errors name the file, line or column."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from peftlab.errors import UserError

READABLE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def file_fingerprint(path: Path) -> str:
    """sha256 of the file's bytes (the data's identity in caches and results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start}, line {line}); re-save the file as UTF-8") \
            from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; give a file with data")
    return text.removeprefix("\ufeff")


def read_txt(path: Path) -> list[dict[str, Any]]:
    """One record per line, under the column 'text' (line endings kept, as in the HF wikitext dataset)."""
    return [{"text": line} for line in _read_text(path).splitlines(keepends=True)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix or remove that line") \
                from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; each line "
                            "must be an object such as {\"text\": ...}")
        records.append(record)
    return records


def read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects (or an object with a 'data' array)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON array of objects; got {type(data).__name__}")
    return data


def read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """CSV or TSV with a header row."""
    reader = csv.DictReader(io.StringIO(_read_text(path)), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL
                            if delimiter == "," else csv.QUOTE_NONE)
    records = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise UserError(f"{path}: line {number} has more fields than the header "
                            f"({', '.join(reader.fieldnames or [])}); check the delimiter and quoting")
        records.append(row)
    return records


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A parquet table, through pyarrow."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several error types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a local data file into a list of records, by its suffix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file {str(p)!r} does not exist; check the path")
    suffix = p.suffix.lower()
    readers = {".txt": read_txt, ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet,
               ".csv": lambda q: read_delimited(q, ","), ".tsv": lambda q: read_delimited(q, "\t")}
    if suffix not in readers:
        raise UserError(f"data file {str(p)!r} has an unsupported type {suffix!r}; use one of "
                        + ", ".join(READABLE_SUFFIXES))
    records = readers[suffix](p)
    if not records:
        raise UserError(f"{p}: the file has no records; give a file with data")
    return records


def require_columns(records: list[dict[str, Any]], columns: list[str], source: str, field_hint: str) -> None:
    """Fail with the list of existing columns when a needed column is missing."""
    have = list(records[0].keys()) if records else []
    for column in columns:
        if column not in have:
            raise UserError(f"{source}: no column {column!r}; the columns are {', '.join(map(str, have))}. "
                            f"Set {field_hint}")
