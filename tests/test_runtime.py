"""Entry points set up their process; importing fedpt sets up nothing."""

import os
import subprocess
import sys

from fedpt.runtime import task


def test_importing_fedpt_changes_nothing_and_setup_does_what_it_says():
    code = ("import os, fedpt, fedpt.cli; before = os.environ.get('HF_HUB_OFFLINE'); "
            "from fedpt.runtime import setup_process; setup_process(); print(before, os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "1"]


def test_a_progress_task_is_added_advanced_and_removed():
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        with task(progress, "work", 3) as advance:
            advance(2)
            (only,) = progress.tasks
            assert only.description == "work" and only.completed == 2
        assert progress.tasks == []
    with task(None, "nothing", 3) as advance:  # no display: advancing does nothing
        advance(1)


def test_a_harmless_library_warning_is_not_shown_to_users(tiny):
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: entry points
    silence that FutureWarning (it is not the user's to fix), and only that one."""
    code = ("import sys, warnings\n"
            "from fedpt.runtime import setup_process\n"
            "if sys.argv[1] == 'set-up': setup_process()\n"
            "from fedpt.config import TuneConfig\n"
            "from fedpt.models import load_model\n"
            "from fedpt.tuning.local import make_trainable\n"
            "make_trainable(load_model(sys.argv[2])[0], TuneConfig())\n"
            "warnings.warn('another deprecation', FutureWarning)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def stderr(mode: str) -> str:
        run = [sys.executable, "-W", "always::FutureWarning", "-c", code, mode, str(tiny["small"])]
        return subprocess.run(run, env=env, capture_output=True, text=True, check=True).stderr

    assert "is_gradient_checkpointing" in stderr("bare")  # the warning is real
    shown = stderr("set-up")
    assert "is_gradient_checkpointing" not in shown and "another deprecation" in shown
