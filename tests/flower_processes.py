"""Starting and stopping Flower's processes (and fedpt's gate) for the deployment tests: each in its own session,
with its own FLWR_HOME, on free loopback ports."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def env(home):
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec by name
            "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def start(command, home, log):
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, env=env(home), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(processes, timeout=15.0):
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + timeout
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def flwr_json(args, home, program="flwr"):
    """`flwr ... --format json`: it exits 0 even on errors, so the JSON's `success` is what counts."""
    result = subprocess.run([str(BIN / program), *args, "--format", "json"], env=env(home), capture_output=True,
                            text=True, timeout=180)
    if "{" not in result.stdout:  # refused before flwr could answer (fedpt-flwr's own checks, a crash)
        return {"success": False, "returncode": result.returncode, "stderr": result.stderr[-2000:]}
    text = result.stdout[result.stdout.index("{"):]
    return json.JSONDecoder().raw_decode(text)[0]


def wait_for_run(run_id, connection, home, watched, program="flwr", flags=(), timeout=300):
    """Poll `flwr ls` until the run finishes (every watched process must stay alive); return (status, run row)."""
    deadline = time.time() + timeout
    while True:
        for p in watched:
            assert p.poll() is None, f"{p.args[0]} died"
        listed = flwr_json([*flags, "ls", connection, "--run-id", run_id], home, program=program)
        assert listed.get("success"), listed
        run = listed["runs"][0]
        if run["status"].startswith("finished"):
            return run["status"], run
        assert time.time() < deadline, f"run {run_id} still {run['status']}"
        time.sleep(2)
