"""Readers for local data files: txt, jsonl, json, csv, tsv, parquet. Errors name the file, line or column.

Text files are decoded with ``encoding`` (any Python codec; default UTF-8). CSV/TSV files have a header row unless
``header=False``, in which case their columns are named by 0-based index: ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import codecs
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


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a one-line error for a name Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"encoding {encoding!r} is not a Python codec; use e.g. --set encoding=latin-1, cp1252 or "
                        "utf-16") from None


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    raw = path.read_bytes()
    codec = check_encoding(encoding)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        shown = "UTF-8" if codec == "utf-8" else encoding
        raise UserError(f"{path}: not valid {shown} (byte {exc.start}, line {line}); pass the file's encoding "
                        "with --set encoding=NAME (e.g. --set encoding=latin-1), or re-save the file as UTF-8") \
            from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; give a file with data")
    return text.removeprefix("\ufeff")


def read_txt(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """One record per line, under the column 'text' (line endings kept, as in the HF wikitext dataset)."""
    return [{"text": line} for line in _read_text(path, encoding).splitlines(keepends=True)]


def read_jsonl(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """One JSON object per non-blank line."""
    records = []
    for number, line in enumerate(_read_text(path, encoding).splitlines(), start=1):
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


def read_json(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """A JSON array of objects (or an object with a 'data' array)."""
    try:
        data = json.loads(_read_text(path, encoding))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON array of objects; got {type(data).__name__}")
    return data


def read_delimited(path: Path, delimiter: str, encoding: str = "utf-8", header: bool = True) -> list[dict[str, Any]]:
    """CSV or TSV, with a header row or (``header=False``) columns named "0", "1", ... by position."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    rows = csv.reader(io.StringIO(_read_text(path, encoding)), delimiter=delimiter, quoting=quoting)
    names = None if not header else next(rows, None)
    records = []
    for number, row in enumerate(rows, start=2 if header else 1):
        if not row:
            continue  # a blank line
        if names is None:
            records.append({str(i): value for i, value in enumerate(row)})
            continue
        if len(row) > len(names):
            raise UserError(f"{path}: line {number} has more fields than the header ({', '.join(names)}); check the "
                            "delimiter and quoting, or pass --set header=false if the file has no header row")
        records.append({name: (row[i] if i < len(row) else None) for i, name in enumerate(names)})
    return records


def looks_like_data(cell: str) -> bool:
    """True for a header cell that reads as a value, not a name: a number such as a class index."""
    try:
        float(str(cell).strip())
    except ValueError:
        return False
    return True


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A parquet table, through pyarrow."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several error types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def read_records(path: str | Path, encoding: str = "utf-8", header: bool = True) -> list[dict[str, Any]]:
    """Read a local data file into a list of records, by its suffix."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"data path {str(p)!r} is a directory, not a file; give a data file inside it, or lay the "
                        "folder out as a hub dataset (data/train-*.parquet, or a README.md with configs)")
    if not p.is_file():
        raise UserError(f"data file {str(p)!r} does not exist; check the path")
    suffix = p.suffix.lower()
    readers = {".txt": lambda q: read_txt(q, encoding), ".jsonl": lambda q: read_jsonl(q, encoding),
               ".json": lambda q: read_json(q, encoding), ".parquet": read_parquet,
               ".csv": lambda q: read_delimited(q, ",", encoding, header),
               ".tsv": lambda q: read_delimited(q, "\t", encoding, header)}
    if suffix not in readers:
        raise UserError(f"data file {str(p)!r} has an unsupported type {suffix!r}; use one of "
                        + ", ".join(READABLE_SUFFIXES))
    records = readers[suffix](p)
    if not records:
        raise UserError(f"{p}: the file has no records; give a file with data")
    return records
