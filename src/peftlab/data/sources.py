"""Where a dataset comes from: an offline mirror, a local file, or the Hugging Face hub.

A named dataset (``wikitext-2-raw-v1``, ``sst2``, ``alpaca-libre``) is read from the offline mirror when one is
configured (``data_dir`` or ``$PEFTLAB_DATA_DIR``) and holds it; otherwise from the hub. Any other name is a local
file when such a file exists, else a hub dataset id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.data.readers import READABLE_SUFFIXES, file_fingerprint, read_records
from peftlab.errors import UserError


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


def data_dir(cfg) -> Path | None:
    """The offline mirror folder, if configured."""
    value = cfg.data_dir or os.environ.get("PEFTLAB_DATA_DIR")
    return Path(value).expanduser() if value else None


def _looks_like_file(name: str) -> bool:
    return name.lower().endswith(READABLE_SUFFIXES) or name.startswith((".", "/", "~"))


def _from_file(path: str, split: str) -> DataSplit:
    p = Path(path).expanduser()
    records = read_records(p)
    return DataSplit(records, f"file:{p}", split, file_fingerprint(p))


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
    if name in NAMED_DATASETS:
        return
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
    elif _looks_like_file(cfg.dataset):
        train = _from_file(cfg.dataset, "train")
        evaluation = None
    else:
        train = _from_hub(cfg.dataset, None, "train")
        evaluation = None if cfg.eval_dataset else _from_hub(cfg.dataset, None, "validation")
    if cfg.eval_dataset:
        if cfg.eval_dataset in NAMED_DATASETS:
            named = NAMED_DATASETS[cfg.eval_dataset]
            evaluation = _named_split(cfg, cfg.eval_dataset, named.eval_split)
        elif _looks_like_file(cfg.eval_dataset):
            evaluation = _from_file(cfg.eval_dataset, "eval")
        else:
            evaluation = _from_hub(cfg.eval_dataset, None, "validation")
    if evaluation is None:
        # A single local file: hold out its last records for evaluation, as HF's run_clm does.
        n_hold = max(1, int(len(train.records) * holdout_fraction))
        if len(train.records) < 2:
            raise UserError(f"{cfg.dataset}: too few records to hold out an evaluation split; give --eval-dataset")
        evaluation = DataSplit(train.records[-n_hold:], train.source + f"[-{n_hold}:]", "holdout",
                               train.fingerprint)
        train = DataSplit(train.records[:-n_hold], train.source + f"[:-{n_hold}]", "train", train.fingerprint)
        note = f"no eval dataset given: held out the last {n_hold} records of {cfg.dataset} for evaluation"
    return SplitPlan(train, evaluation, note)

