"""Six of the new methods train the real SmolLM2-135M through the public pipeline, and perplexity falls.

Learning rates were checked with the same data, 4 steps of batch 2 (loha 5e-3: 52.06 -> 51.43, lokr 3e-3: -> 50.91,
vera 2e-2: -> 51.18, adalora 2e-2: -> 51.41, oft 1e-3: -> 44.43, ln_tuning 5e-3: -> 46.40).
"""

from __future__ import annotations

import importlib.util

import pytest

LEARNING_RATES = {"loha": 5e-3, "lokr": 3e-3, "vera": 2e-2, "adalora": 2e-2, "oft": 1e-3, "ln_tuning": 5e-3}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("peftlab.configure") is None,
                       reason="needs the method registry's pipeline (peftlab.configure)"),
]


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_smollm2_new_method_perplexity_falls(method, tmp_path, data_dir):
    from peftlab.configure import load_config
    from peftlab.train import run_training

    cfg = load_config(None, {"model": "smollm2-135m", "method": method, "train_subset": 32, "eval_subset": 8,
                             "max_steps": 4, "batch_size": 2, "grad_accum": 1, "lr": LEARNING_RATES[method],
                             "output_dir": str(tmp_path / method)})
    results = run_training(cfg).to_dict()
    assert results["metrics"]["after"]["perplexity"] < results["metrics"]["before"]["perplexity"]
