"""Config validation: seed defaults, one-line actionable errors, method-specific fields."""

from __future__ import annotations

import pytest

from peftlab.config import RunConfig, load_config
from peftlab.errors import UserError


def test_defaults_are_the_seeds():
    cfg = RunConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout) == (8, 16, 0.1)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.lr, cfg.block_size, cfg.batch_size, cfg.grad_accum, cfg.epochs) == (2e-4, 128, 4, 8, 1)
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False


@pytest.mark.parametrize("field,value,needle", [
    ("r", 0, "'r'"), ("r", -3, "'r'"), ("alpha", 0, "'alpha'"), ("alpha", -1.0, "'alpha'"),
    ("block_size", 0, "'block_size'"), ("lr", 0, "'lr'"), ("dropout", 1.5, "'dropout'"),
])
def test_out_of_range_values_name_the_field(field, value, needle):
    with pytest.raises(UserError) as err:
        load_config(None, {field: value})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_field_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lrr: 0.001\n")
    with pytest.raises(UserError, match=r"unknown config field 'lrr'.*did you mean 'lr'"):
        load_config(path)


def test_unknown_method_and_task_list_the_choices():
    with pytest.raises(UserError, match=r"unknown method 'lorax'.*qlora"):
        load_config(None, {"method": "lorax"})
    with pytest.raises(UserError, match=r"unknown task 'summarise'.*clm"):
        load_config(None, {"task": "summarise"})


def test_method_rejects_fields_it_does_not_take():
    with pytest.raises(UserError, match=r"method 'ia3' does not take r"):
        load_config(None, {"method": "ia3", "r": 8})
    with pytest.raises(UserError, match=r"method 'full' does not take alpha"):
        load_config(None, {"method": "full", "alpha": 32})
    assert load_config(None, {"method": "ia3", "target_modules": "k_proj,down_proj"}).target_modules == [
        "k_proj", "down_proj"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("r: 16\nalpha: 32\nlr: 0.001\n")
    cfg = load_config(path, {"lr": 0.01, "seed": None})
    assert (cfg.r, cfg.alpha, cfg.lr, cfg.seed) == (16, 32, 0.01, 42)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("r: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("method", ["lora", "ia3", "full", "qlora", "prefix"])
def test_a_runs_saved_config_loads_again(tmp_path, method):
    from peftlab.record import RunDir

    cfg = load_config(None, {"method": method, "output_dir": str(tmp_path / "run")})
    RunDir.open_for(cfg)
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.model_dump() == cfg.model_dump()
