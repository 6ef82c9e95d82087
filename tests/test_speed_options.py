"""Each speed option leaves the loss curve equal (within float tolerance) to the plain path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.configure import load_config
from peftlab.train import run_training
from tests.conftest import tiny_overrides

PLAIN = dict(chunked_ce=False, fused_optimizer=False, compile=False)


def loss_curve(tmp_path: Path, name: str, **options) -> list[float]:
    overrides = tiny_overrides(tmp_path / name, train_subset=16, batch_size=4, grad_accum=2, epochs=2, dropout=0.0,
                               eval_before=False, **{**PLAIN, **options})
    results = run_training(load_config(None, overrides)).to_dict()
    rows = [json.loads(x) for x in open(Path(results["run_dir"]) / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def plain_curve(tmp_path_factory):
    return loss_curve(tmp_path_factory.mktemp("plain"), "plain")


@pytest.mark.parametrize("option", ["chunked_ce", "fused_optimizer"])
def test_option_keeps_the_loss_curve(tmp_path, plain_curve, option):
    curve = loss_curve(tmp_path, option, **{option: True})
    assert len(curve) == len(plain_curve) == 4
    assert curve == pytest.approx(plain_curve, rel=1e-5)


@pytest.mark.slow
def test_compile_keeps_the_loss_curve(tmp_path, plain_curve):
    curve = loss_curve(tmp_path, "compile", compile=True)
    assert curve == pytest.approx(plain_curve, rel=1e-5)
