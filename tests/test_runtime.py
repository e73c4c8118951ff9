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
