"""`peftlab train --processes N`: the relaunch command, the thread share, and its bad-input errors."""

from __future__ import annotations

import sys

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


def test_processes_inside_a_launcher_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--model", "tiny-llama", "--processes", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err
