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


def test_a_failing_client_is_one_console_line_per_round(tiny_run, tmp_path, capfd):
    from test_hostile import hostile_client_app

    run = tiny_run(tmp_path / "run", federation={"clients": 2, "rounds": 2, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid"})
    simulate(run, client_app=hostile_client_app({1: "crash"}))
    err = capfd.readouterr().err
    failures = [line for line in err.splitlines() if "disk is full" in line]
    assert len(failures) == 2, err  # one per round, naming the client and the reason (before: 60+ lines each)
    assert all("client 1" in line for line in failures) and "Traceback" not in err, err
    details = (tmp_path / "run" / "server.log").read_text()  # where the line points: the client's stack
    assert 'test_hostile.py", line' in details and "RuntimeError: this client's disk is full" in details


def test_kill_9_of_fedpt_train_leaves_no_process_of_the_run(tiny, qa_file, tmp_path):
    import os
    import signal
    import subprocess

    import psutil
    from flower_processes import BIN, env

    from fedpt.federation.reaper import MARK

    settings = [f'model.small="{tiny["small"]}"', f'model.large="{tiny["large"]}"', f'data.source="{qa_file}"',
                'data.group_field="topic"', "data.test_percent=20", "data.validation_percent=0",
                "federation.clients=2", "federation.rounds=50", "federation.client_cpus=1",
                "federation.eval_examples=4",
                'tuning.dtype="float32"', "tuning.local_steps=2", "tuning.batch_size=2", "tuning.max_length=32"]
    train = subprocess.Popen([str(BIN / "fedpt"), "train", "--out", str(tmp_path / "run"),
                              *[a for s in settings for a in ("--set", s)]], env=env(tmp_path / "home"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def run_processes():
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(MARK, "").startswith(f"{train.pid}-"):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    deadline = time.time() + 240
    while not (tmp_path / "run" / "round-1" / "round.json").is_file():  # Ray and its workers are up
        assert train.poll() is None and time.time() < deadline, "the run did not reach round 1"
        time.sleep(1)
    started = run_processes()
    assert any("ray::" in " ".join(p.cmdline()) or "raylet" in p.name() for p in started), started
    os.kill(train.pid, signal.SIGKILL)
    train.wait()
    time.sleep(10)  # before: ray::DashboardAgent and ray::RuntimeEnvAgent were alive after 60 s
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.name() for p in alive]
