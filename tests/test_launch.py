"""`peftlab train --processes N`: the relaunch command, the thread share, and its bad-input errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.launch import strip_processes_flag, threads_per_process, torchrun_command


def test_relaunch_keeps_every_argument_but_processes():
    argv = ["train", "--processes", "2", "--model", "tiny-llama", "--processes=3", "--r", "8"]
    assert strip_processes_flag(argv) == ["train", "--model", "tiny-llama", "--r", "8"]
    cmd = torchrun_command(argv, 2)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6:] == ["-m", "--", "peftlab", "train", "--model", "tiny-llama", "--r", "8"]


def test_torchrun_hands_every_train_flag_to_peftlab():
    """torchrun's argparse would take --r for an abbreviation of its own --rdzv-* options without the "--"."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(torchrun_command(["train", "--r", "8", "--role", "x"], 2)[3:])
    assert parsed.module and parsed.training_script == "peftlab"
    assert parsed.training_script_args == ["train", "--r", "8", "--role", "x"]


def test_each_process_gets_an_equal_share_of_the_cores():
    assert threads_per_process(2, cpu_count=2) == 1
    assert threads_per_process(2, cpu_count=16) == 8
    assert threads_per_process(4, cpu_count=2) == 1


def test_bad_process_count_exits_2_before_launching(capsys):
    assert main(["train", "--model", "tiny-llama", "--processes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--processes 0" in err[0]


def test_bad_data_exits_2_with_one_line_before_any_process_starts(capsys):
    assert main(["train", "--processes", "2", "--model", "tiny-llama", "--dataset", "/nonexistent/data.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["peftlab: error: data file '/nonexistent/data.txt' does not exist; check the path"]


def test_a_failing_rank_keeps_its_exit_code_and_message(tmp_path):
    """Past the parent's checks, each rank reports its own one-line error; torchrun adds no report of its own."""
    if not (Path(os.environ["PEFTLAB_DATA_DIR"]) / "wikitext-2-raw-v1").is_dir():
        pytest.skip("dataset mirror not found")
    cmd = [sys.executable, "-m", "peftlab", "train", "--processes", "2", "--model", "tiny-llama", "--dataset",
           "wikitext-2-raw-v1", "--train-subset", "16", "--eval-subset", "4", "--max-steps", "2", "--grad-accum", "1",
           "--set", "max_rss_gb=0.01", "--set", "eval_before=false", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors and all("peftlab: error: memory:" in line for line in errors), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "failed.json").is_file()


def test_processes_inside_a_launcher_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--model", "tiny-llama", "--processes", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err
