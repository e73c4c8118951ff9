"""A simulation's reaper: when the process that ran it ends - normally, by an exception, or by `kill -9` - every
process it started ends too. Ray's daemons and agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) outlived a
killed `fedpt train` by minutes; they inherit the environment, so a mark in it finds them all, and a small process
of its own session, which no signal to the run reaches, waits for the run and then ends what carries its mark.

    python -m fedpt.federation.reaper PARENT_PID MARK     (started by `watch()`, never by hand)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

MARK = "FEDPT_RUN_MARK"  # set in the environment of every process a simulation starts
GRACE_S = 3.0  # between asking the run's processes to stop and killing them


def watch() -> None:
    """Mark the processes this one starts from now on, and start the reaper that ends them after it (once per
    process: every simulation this process runs shares the mark)."""
    if os.environ.get(MARK, "").startswith(f"{os.getpid()}-"):
        return
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != MARK}  # the reaper must not carry the mark itself
    subprocess.Popen([sys.executable, "-m", "fedpt.federation.reaper", str(os.getpid()), mark], env=env,
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)
    os.environ[MARK] = mark


def marked(mark: str) -> list:
    """The live processes whose environment carries `mark` (this user's; others' cannot be read)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(MARK) == mark:
                found.append(process)
        except psutil.Error:
            pass
    return found


def reap(parent: int, mark: str) -> None:
    import psutil

    try:
        watched = psutil.Process(parent)
        while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.5)
    except psutil.Error:  # already gone
        pass
    processes = marked(mark)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2])
