"""Each task owns its settings (``Task.fields``); what the rest of the code knows about them is derived from that."""

from __future__ import annotations

import pytest

from peftlab.config import RunConfig
from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.evaluate import EVAL_INHERITED, EVAL_RUN_FIELDS
from peftlab.methods import get_method, method_names
from peftlab.tasks import TASKS, eval_inherited_fields, task_names
from peftlab.tasks.base import DATA_FIELDS, TaskFields, task_fields


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_tasks_settings_keep_runconfigs_names_types_and_defaults(name):
    fields = TASKS[name].fields
    assert issubclass(fields, TaskFields) and set(DATA_FIELDS) <= set(fields.model_fields)
    for field, info in fields.model_fields.items():
        declared = RunConfig.model_fields[field]
        assert (info.annotation, info.default, info.description) == \
            (declared.annotation, declared.default, declared.description)
    assert fields.training_only <= set(fields.model_fields)


def test_a_tasks_settings_are_read_from_a_config():
    cfg = load_config(None, {"task": "instruction", "max_length": 96, "packing": True})
    settings = TASKS["instruction"].fields.of(cfg)
    assert (settings.max_length, settings.packing, settings.dataset) == (96, True, cfg.dataset)
    with pytest.raises(TypeError, match="not_a_field"):
        task_fields("Broken", "not_a_field")


def test_evaluation_inherits_each_tasks_evaluation_settings_and_no_training_ones():
    assert EVAL_INHERITED == set(EVAL_RUN_FIELDS) | eval_inherited_fields()
    for cls in TASKS.values():
        assert set(cls.fields.model_fields) - cls.fields.training_only <= EVAL_INHERITED
        assert not cls.fields.training_only & EVAL_INHERITED
    assert {"block_size", "label_column", "prompt_template", "generation_subset"} <= EVAL_INHERITED
    assert not {"packing", "train_subset", "sample_prompt"} & EVAL_INHERITED


def test_the_task_help_lists_the_registered_tasks_when_it_is_shown():
    import subprocess
    import sys

    assert task_names()[0] == "clm"  # table order
    shown = subprocess.run([sys.executable, "-m", "peftlab", "train", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert f": {' | '.join(task_names())} (default clm)" in " ".join(shown.split())
    code = "import sys; import peftlab.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # building the parser lists no task (that imports torch)


def test_packing_is_checked_against_the_method_when_the_config_is_built():
    cannot = [n for n in method_names() if not get_method(n).supports("packing")]
    assert cannot
    for name in cannot:
        with pytest.raises(UserError, match=f"field 'packing': method '{name}' "):
            load_config(None, {"task": "instruction", "method": name, "packing": True})
    assert load_config(None, {"task": "clm", "method": cannot[0], "packing": True}).packing  # clm does not pack


def test_any_tasks_needs_are_checked(monkeypatch):
    """The check reads the task's declaration, not a list of its own: a task whose setting needs "merge"."""
    monkeypatch.setattr(TASKS["clm"], "fields", task_fields("Needy", "block_size", needs={"packing": "merge"}))
    with pytest.raises(UserError, match="field 'packing': method 'full' trains every weight"):
        load_config(None, {"task": "clm", "method": "full", "packing": True})
    assert load_config(None, {"task": "clm", "method": "full"}).method == "full"
