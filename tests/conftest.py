"""Shared test set-up: offline hub, the shared dataset mirror, and small config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", REPO.parent / "shared" / "datasets"))
os.environ["PEFTLAB_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def auto_precision_is_fp32():
    """In-process, ``precision: auto`` resolves as on a CPU without native bf16 (fp32) on every host, so tests that
    compare numbers do not depend on which CPU runs them; bf16 tests ask for their precision explicitly. (Session
    scope: module-scoped model fixtures load under it too. Subprocess tests pass --precision themselves.)"""
    from peftlab import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "detect", lambda device, cpuinfo_path=None: precision.Capabilities(device))
        yield


@pytest.fixture(autouse=True, scope="session")
def session_baseline_cache(tmp_path_factory):
    """The session's shared-baseline cache (module-scoped run fixtures are made before a test's own): never the
    user's cache."""
    from peftlab.baseline import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("baselines-session")))
        yield


@pytest.fixture(autouse=True)
def own_baseline_cache(tmp_path_factory, monkeypatch):
    """Each test its own shared-baseline cache: no entry of another test (or of the user's runs) is reused."""
    from peftlab.baseline import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("baselines")))


@pytest.fixture
def data_dir() -> Path:
    """The offline dataset mirror (../shared/datasets)."""
    if not (SHARED_DATA / "wikitext-2-raw-v1").is_dir():
        pytest.skip(f"dataset mirror not found at {SHARED_DATA}")
    return SHARED_DATA


def tiny_overrides(tmp_path: Path, **extra) -> dict:
    """A fast clm run on tiny-llama: few blocks, small batches."""
    # precision fp32: the same numbers in-process and in a subprocess (where `auto` follows the host's CPU)
    base = dict(model="tiny-llama", dataset="wikitext-2-raw-v1", train_subset=32, eval_subset=8, batch_size=4,
                grad_accum=2, lr=1e-2, output_dir=str(tmp_path / "run"), eval_before=True, max_new_tokens=8,
                precision="fp32")
    base.update(extra)
    return base
