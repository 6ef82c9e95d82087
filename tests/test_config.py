"""Config validation: seed defaults, one-line actionable errors, method-specific fields, and RunConfig itself
importable without torch or the registries."""

from __future__ import annotations

import pytest

from peftlab.config import RunConfig
from peftlab.configure import load_config
from peftlab.errors import UserError


def test_defaults_are_the_seeds():
    cfg = load_config(None, {})
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


def test_all_invalid_fields_of_a_yaml_config_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("r: 0\nlrr: 0.1\nlr: -1\nrank: 4\nnum_virtual_tokens: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    for part in ("field 'r'", "field 'lr'", "unknown config field 'lrr' (did you mean 'lr'?)",
                 "unknown config field 'rank' (did you mean 'r'?)", "method 'lora' does not take num_virtual_tokens"):
        assert part in msg


@pytest.mark.parametrize(("given", "meant"), [("rank", "r"), ("learning_rate", "lr"), ("lora_alpha", "alpha"),
                                              ("lora_dropout", "dropout"), ("num_epochs", "epochs")])
def test_synonyms_suggest_our_field(given, meant):
    with pytest.raises(UserError, match=f"unknown config field '{given}' \\(did you mean '{meant}'\\?\\)"):
        load_config(None, {given: 1})


def test_cli_reports_every_bad_field_exit_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text("alpha: -1\nepochz: 2\n")
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", "--config", str(path), "--output-dir",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "field 'alpha'" in line and "'epochz' (did you mean 'epochs'?)" in line


def test_method_fields_are_the_methods():
    cfg = load_config(None, {"method": "qlora", "r": 4})
    assert cfg.method_fields() == {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 16, "dropout": 0.1,
                                   "bias": "none", "quant_type": "nf4", "double_quant": True}
    assert cfg.is_set("r") and not cfg.is_set("alpha") and not cfg.is_set("target_modules")
    assert "r" not in load_config(None, {"method": "full"}).model_dump()
    assert "r" not in RunConfig.model_fields  # RunConfig alone declares no method field
    assert load_config(None, {"method": "lora", "r": "16"}).r == 16  # coerced by the method's fields model


def test_run_config_imports_without_torch_or_registries():
    import subprocess
    import sys

    code = ("import sys; import peftlab.config; "
            "print(sorted(m for m in ('torch', 'peftlab.methods', 'peftlab.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_defaults_come_from_the_fields():
    from peftlab.cli import field_help

    assert "(default 1.0)" in field_help("max_grad_norm")
    assert "(default 16" in field_help("alpha") and "(default 0.1" in field_help("dropout")
    assert "qlora" in field_help("method")


def test_a_record_older_than_a_defining_field_counts_it_as_its_default():
    """Runs recorded before chat_loss and chat_format existed are adopted by a sweep and grouped with new ones."""
    from peftlab.config import RUN_DEFINING_FIELDS, RunConfig, defining_fields

    new = RunConfig(model="tiny-llama").model_dump(mode="json")
    old = {k: v for k, v in new.items() if k not in ("chat_loss", "chat_format")}
    assert {"chat_loss", "chat_format"} <= set(RUN_DEFINING_FIELDS)
    assert defining_fields(old) == defining_fields(new)
    assert defining_fields({**old, "chat_loss": "last"}) != defining_fields(new)
