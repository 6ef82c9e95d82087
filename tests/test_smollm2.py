"""A short run on the real pretrained SmolLM2-135M: a few steps, perplexity falls, the adapter reloads."""

from __future__ import annotations

import math

import pytest

from peftlab.configure import load_config
from peftlab.evaluate import run_eval
from peftlab.train import run_training


@pytest.mark.slow
def test_smollm2_lora_few_steps(tmp_path, data_dir):
    cfg = load_config(None, dict(model="smollm2-135m", train_subset=16, eval_subset=8, batch_size=4, grad_accum=2,
                                 lr=1e-3, max_new_tokens=8, output_dir=str(tmp_path / "run")))
    results = run_training(cfg).to_dict()
    assert results["model"]["architecture"] == "LlamaForCausalLM"
    before, after = results["metrics"]["before"]["perplexity"], results["metrics"]["after"]["perplexity"]
    assert 5 < before < 500, "a pretrained model, not random init (random would be ~49k)"
    assert after < before
    assert results["params"]["trainable_params"] == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)
    again = run_eval({}, f"{results['run_dir']}/adapter")
    assert math.isclose(again["metrics"]["perplexity"], after, rel_tol=1e-4)
    assert results["sample"]["generation"]
