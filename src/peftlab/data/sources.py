"""Where a dataset comes from: an offline mirror, a local file, or the Hugging Face hub.

A named dataset (``wikitext-2-raw-v1``, ``sst2``, ``alpaca-libre``) is read from the offline mirror when one is
configured (``data_dir`` or ``$PEFTLAB_DATA_DIR``) and holds it; otherwise from the hub. Any other name is a local
file when such a file exists, a local folder laid out as a hub dataset repository (``data/train-*.parquet``, or a
``README.md`` whose front matter has ``configs``) read through ``datasets.load_dataset``, else a hub dataset id.

A text column given as a comma list (``--text-column 1,2``) names several columns whose texts are joined with
:data:`TEXT_JOIN` (a blank line) into one column named as given; the tasks read it like any other column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.data.readers import READABLE_SUFFIXES, file_fingerprint, looks_like_data, read_records
from peftlab.errors import UserError

#: Separator between the texts of several joined text columns (e.g. a title and a body).
TEXT_JOIN = "\n\n"


@dataclass(frozen=True)
class NamedDataset:
    """A dataset peftlab knows by name: its mirror files and its hub location."""

    mirror_folder: str
    mirror_files: dict[str, str]  # split -> file name in the mirror folder
    hub_path: str | None
    hub_name: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> hub split
    train_split: str = "train"
    eval_split: str = "validation"


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext-2-raw-v1": NamedDataset("wikitext-2-raw-v1", {"validation": "validation.txt", "test": "test.txt"},
                                      "wikitext", "wikitext-2-raw-v1"),
    "sst2": NamedDataset("sst2", {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
                         "glue", "sst2", {"train": "train", "validation": "validation", "test": "test"}),
    "alpaca-libre": NamedDataset("alpaca-libre", {"train": "train.jsonl", "test": "test.jsonl"}, None,
                                 eval_split="test"),
}


@dataclass
class DataSplit:
    """Records of one split plus where they came from."""

    records: list[dict[str, Any]]
    source: str  # e.g. "mirror:wikitext-2-raw-v1/validation.txt", "file:/x.jsonl", "hub:wikitext/..:train"
    split: str
    fingerprint: str
    first_line: int | None = None  # file line of records[0] (csv/tsv read whole or in part), for messages
    rows: tuple[int, int] | None = None  # [start, stop) of the file's records this split holds, when a part

    def row_name(self, index: int) -> str:
        """'row N' of the split (1-based), plus the file line for a csv/tsv file."""
        where = f"row {index + 1}"
        return where if self.first_line is None else where + f" (line {self.first_line + index})"


def data_dir(cfg) -> Path | None:
    """The offline mirror folder, if configured."""
    value = cfg.data_dir or os.environ.get("PEFTLAB_DATA_DIR")
    return Path(value).expanduser() if value else None


def _looks_like_file(name: str) -> bool:
    return name.lower().endswith(READABLE_SUFFIXES) or name.startswith((".", "/", "~"))


def is_dataset_folder(name: str) -> bool:
    """A local folder laid out as a hub dataset repository: data/ with data files, or a README.md with configs."""
    p = Path(name).expanduser()
    if not p.is_dir():
        return False
    data = p / "data"
    if data.is_dir() and any(f.suffix.lower() in READABLE_SUFFIXES for f in data.rglob("*") if f.is_file()):
        return True
    readme = p / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            import yaml

            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                return False
            return isinstance(front, dict) and "configs" in front
    return False


def _from_file(path: str, split: str, cfg=None) -> DataSplit:
    p = Path(path).expanduser()
    encoding, header = getattr(cfg, "encoding", "utf-8"), getattr(cfg, "header", True)
    records = read_records(p, encoding=encoding, header=header)
    delimited = p.suffix.lower() in (".csv", ".tsv")
    return DataSplit(records, f"file:{p}", split, file_fingerprint(p), (2 if header else 1) if delimited else None)


def _from_folder(path: str, split: str) -> DataSplit:
    """One split of a local folder laid out as a hub dataset repository."""
    import datasets

    p = Path(path).expanduser()
    try:
        ds = datasets.load_dataset(str(p), split=split)
    except Exception as exc:  # datasets raises many types for a malformed folder or a missing split
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"dataset folder {str(p)!r} could not be loaded ({first[:200]}); lay it out as "
                        "data/<split>-*.parquet (or .csv/.jsonl), or list its configs in README.md") from None
    return DataSplit(ds.to_list(), f"folder:{p}:{split}", split, ds._fingerprint)


def folder_splits(path: str) -> list[str]:
    """The split names a dataset folder declares (through datasets' own resolution)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(str(Path(path).expanduser())))
    except Exception as exc:  # as in _from_folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"dataset folder {path!r} could not be read ({first[:200]}); lay it out as "
                        "data/<split>-*.parquet (or .csv/.jsonl), or list its configs in README.md") from None


def _from_hub(path: str, name: str | None, split: str) -> DataSplit:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"dataset {path!r} could not be loaded from the hub ({first[:200]}); for offline use set "
                        "PEFTLAB_DATA_DIR to a mirror, or give a local file") from None
    return DataSplit(ds.to_list(), f"hub:{path}/{name or ''}:{split}", split, ds._fingerprint)


def _mirror_path(cfg, named: NamedDataset, split: str) -> Path | None:
    root = data_dir(cfg)
    if root is None or split not in named.mirror_files:
        return None
    path = root / named.mirror_folder / named.mirror_files[split]
    return path if path.is_file() else None


def _named_split(cfg, key: str, split: str) -> DataSplit:
    named = NAMED_DATASETS[key]
    mirror = _mirror_path(cfg, named, split)
    if mirror is not None:
        out = _from_file(str(mirror), split)
        out.source = f"mirror:{named.mirror_folder}/{mirror.name}"
        return out
    if named.hub_path is None:
        raise UserError(f"dataset {key!r} has no split {split!r} in the offline mirror and no hub copy; set "
                        "PEFTLAB_DATA_DIR (or data_dir) to the folder that holds it")
    return _from_hub(named.hub_path, named.hub_name, named.hub_splits.get(split, split))


def _mirror_has_no(cfg, key: str, split: str) -> bool:
    """True when an offline mirror holds this named dataset but not this split (e.g. WikiText-2 train)."""
    named = NAMED_DATASETS[key]
    root = data_dir(cfg)
    return (root is not None and (root / named.mirror_folder).is_dir()
            and _mirror_path(cfg, named, split) is None)


def check_dataset_name(name: str) -> None:
    """Fail early on a dataset that is neither known, a file, nor plausibly a hub id."""
    if name in NAMED_DATASETS or is_dataset_folder(name):
        return
    if Path(name).expanduser().is_dir():
        raise UserError(f"dataset {name!r} is a directory, not a data file; give a file inside it, or lay the "
                        "folder out as a hub dataset (data/train-*.parquet, or a README.md with configs)")
    if _looks_like_file(name):
        if not Path(name).expanduser().is_file():
            raise UserError(f"data file {name!r} does not exist; check the path")
        return
    if "/" not in name:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(NAMED_DATASETS)}, a local file "
                        f"({', '.join(READABLE_SUFFIXES)}), or a hub id such as 'org/name'")


@dataclass
class SplitPlan:
    """The train and eval splits a run uses, with a note when the offline mirror forced a substitute."""

    train: DataSplit
    eval: DataSplit | None
    note: str | None = None


def load_splits(cfg, holdout_fraction: float = 0.05) -> SplitPlan:
    """Resolve ``cfg.dataset`` / ``cfg.eval_dataset`` into train and eval records."""
    check_dataset_name(cfg.dataset)
    if cfg.eval_dataset:
        check_dataset_name(cfg.eval_dataset)
    note = None
    if cfg.dataset in NAMED_DATASETS:
        named = NAMED_DATASETS[cfg.dataset]
        train_split, eval_split = named.train_split, named.eval_split
        if _mirror_has_no(cfg, cfg.dataset, train_split):
            # Offline: the mirror has no train split. Train on the eval split, evaluate on test.
            note = (f"offline mirror has no {train_split!r} split of {cfg.dataset}: trained on "
                    f"{eval_split!r}, evaluated on 'test'")
            train_split, eval_split = eval_split, "test"
        if cfg.eval_split:
            eval_split = cfg.eval_split
        train = _named_split(cfg, cfg.dataset, train_split)
        evaluation = None if cfg.eval_dataset else _named_split(cfg, cfg.dataset, eval_split)
    elif is_dataset_folder(cfg.dataset):
        splits = folder_splits(cfg.dataset)
        if "train" not in splits:
            raise UserError(f"dataset folder {cfg.dataset!r} has no train split (it has {', '.join(splits)}); name "
                            "its training files data/train-*.parquet (or .csv/.jsonl)")
        train = _from_folder(cfg.dataset, "train")
        wanted = cfg.eval_split or next((s for s in ("validation", "test") if s in splits), None)
        evaluation = None if cfg.eval_dataset or wanted is None else _from_folder(cfg.dataset, wanted)
    elif _looks_like_file(cfg.dataset):
        train = _from_file(cfg.dataset, "train", cfg)
        evaluation = None
    else:
        train = _from_hub(cfg.dataset, None, "train")
        evaluation = None if cfg.eval_dataset else _from_hub(cfg.dataset, None, "validation")
    if cfg.eval_dataset:
        if cfg.eval_dataset in NAMED_DATASETS:
            named = NAMED_DATASETS[cfg.eval_dataset]
            evaluation = _named_split(cfg, cfg.eval_dataset, named.eval_split)
        elif is_dataset_folder(cfg.eval_dataset):
            splits = folder_splits(cfg.eval_dataset)
            evaluation = _from_folder(cfg.eval_dataset, cfg.eval_split or next(
                (s for s in ("validation", "test", "train") if s in splits), splits[0]))
        elif _looks_like_file(cfg.eval_dataset):
            evaluation = _from_file(cfg.eval_dataset, "eval", cfg)
        else:
            evaluation = _from_hub(cfg.eval_dataset, None, "validation")
    if evaluation is None:
        # A single local file: hold out its last records for evaluation, as HF's run_clm does.
        n_hold = max(1, int(len(train.records) * holdout_fraction))
        if len(train.records) < 2:
            raise UserError(f"{cfg.dataset}: too few records to hold out an evaluation split; give --eval-dataset")
        # The source stays the file's name (users see it in messages); the part is in ``rows``, the split name.
        n = len(train.records)
        line = None if train.first_line is None else train.first_line + n - n_hold
        evaluation = DataSplit(train.records[-n_hold:], train.source, "holdout", train.fingerprint, line,
                               (n - n_hold, n))
        train = DataSplit(train.records[:-n_hold], train.source, "train", train.fingerprint, train.first_line,
                          (0, n - n_hold))
        note = f"no eval dataset given: held out the last {n_hold} records of {cfg.dataset} for evaluation"
    for split in (train, evaluation):
        prepare_columns(cfg, split)
    return SplitPlan(train, evaluation, note)


def _named_columns(cfg) -> list[str]:
    """The columns a config names explicitly: the text column(s), the pair column, the label column."""
    text = str(getattr(cfg, "text_column", "text"))
    names = [text] if "," not in text else [part.strip() for part in text.split(",") if part.strip()]
    pair = getattr(cfg, "text_pair_column", None)
    return names + ([str(pair)] if pair else []) + [str(getattr(cfg, "label_column", "label"))]


def prepare_columns(cfg, split: DataSplit) -> None:
    """Join several text columns into one, and say so when a csv/tsv header row is really data."""
    if not split.records:
        return
    have = list(split.records[0].keys())
    if split.first_line == 2 and not all(name in have for name in _named_columns(cfg)):
        data_like = [cell for cell in have if looks_like_data(cell)]
        if data_like:
            raise UserError(f"{split.source}: the first row looks like data, not a header (the cell {data_like[0]!r}"
                            " is a number where a column name should be); if the file has no header row, pass "
                            "--set header=false and name columns by 0-based index (--text-column 1 --label-column 0)")
    text = str(cfg.text_column)
    if "," not in text or text in have:
        return
    parts = [part.strip() for part in text.split(",") if part.strip()]
    missing = [part for part in parts if part not in have]
    if missing:
        raise UserError(f"{split.source}: no column {missing[0]!r} (of --text-column {text}); the columns are "
                        f"{', '.join(map(str, have))}")
    for record in split.records:
        record[text] = TEXT_JOIN.join(str(record[p]) for p in parts if record.get(p) not in (None, ""))

