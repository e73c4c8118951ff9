"""A run ends: `fedpt train` returns soon after final/ whatever a client does, and leaves no process behind."""

import time

import pytest

from fedpt.federation.simulation import simulate

pytestmark = pytest.mark.slow


def test_a_client_that_never_answers_does_not_keep_the_run_alive(tiny_run, tmp_path):
    from test_hostile import hostile_client_app

    run = tiny_run(tmp_path / "run", federation={"clients": 2, "rounds": 1, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid", "timeout": 10.0})
    final = simulate(run, client_app=hostile_client_app({1: "silent"}, sleep=10**6))
    written = (final / ".fedpt-final").stat().st_mtime
    assert time.time() - written < 30  # before: the simulation's shutdown waited on the silent client for ever
