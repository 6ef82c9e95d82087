"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no finished-looking run."""

from __future__ import annotations

import pytest

from peftlab.cli import main
from tests.conftest import tiny_overrides


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("peftlab: error:")]
    return code, errors[-1] if errors else ""


def train_args(tmp_path, **extra) -> list[str]:
    args = ["train"]
    for key, value in tiny_overrides(tmp_path, **extra).items():
        if key in ("eval_before", "max_new_tokens"):
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def assert_one_line_error(code: int, line: str, *needles: str) -> None:
    assert code == 2
    assert line, "expected a 'peftlab: error:' line"
    for needle in needles:
        assert needle in line, line


def test_unknown_dataset(tmp_path, capsys, data_dir):
    code, line = run_cli(train_args(tmp_path, dataset="wikitext-9"), capsys)
    assert_one_line_error(code, line, "unknown dataset 'wikitext-9'", "wikitext-2-raw-v1")


def test_missing_file(tmp_path, capsys):
    code, line = run_cli(train_args(tmp_path, dataset=str(tmp_path / "nope.txt")), capsys)
    assert_one_line_error(code, line, "nope.txt", "does not exist")


def test_unknown_method(tmp_path, capsys):
    code, line = run_cli(train_args(tmp_path) + ["--method", "lorra"], capsys)
    assert_one_line_error(code, line, "unknown method 'lorra'", "lora")


@pytest.mark.parametrize("flag", ["--r", "--alpha"])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_non_positive_rank_or_alpha(tmp_path, capsys, flag, value):
    code, line = run_cli(train_args(tmp_path) + [flag, value], capsys)
    assert_one_line_error(code, line, f"'{flag[2:]}'", "greater than 0")


def test_target_module_the_model_lacks(tmp_path, capsys, data_dir):
    code, line = run_cli(train_args(tmp_path) + ["--target-modules", "q_proj,wq"], capsys)
    assert_one_line_error(code, line, "no linear module named wq", "its linear modules are", "down_proj",
                          "v_proj")
    assert not (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "failed.json").exists()


def test_block_size_over_max_positions(tmp_path, capsys, data_dir):
    code, line = run_cli(train_args(tmp_path) + ["--block-size", "1024"], capsys)
    assert_one_line_error(code, line, "block_size 1024", "maximum positions (512)")
    assert not (tmp_path / "run" / "results.json").exists()


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, line = run_cli(train_args(tmp_path, dataset=str(empty)), capsys)
    assert_one_line_error(code, line, "empty.txt", "empty")


def test_dataset_too_short_for_one_block(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words\nand a few more\n")
    code, line = run_cli(train_args(tmp_path, dataset=str(short)), capsys)
    assert_one_line_error(code, line, "short.txt", "too short for a single block of 128 tokens")
    assert not (tmp_path / "run" / "results.json").exists()


def test_output_dir_with_finished_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    code, line = run_cli(train_args(tmp_path), capsys)
    assert_one_line_error(code, line, "already holds a finished run", "--overwrite")
    assert (run / "results.json").read_text() == "{}"  # untouched


def test_bad_set_syntax(tmp_path, capsys):
    code, line = run_cli(train_args(tmp_path) + ["--set", "warmup_ratio"], capsys)
    assert_one_line_error(code, line, "FIELD=VALUE")


def test_missing_model_folder(tmp_path, capsys):
    code, line = run_cli(train_args(tmp_path, model=str(tmp_path / "no-model")), capsys)
    assert_one_line_error(code, line, "does not exist")


def test_pickle_weights_refused(tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, line = run_cli(train_args(tmp_path, model=str(folder)), capsys)
    assert_one_line_error(code, line, "pickle", "--allow-pickle")
