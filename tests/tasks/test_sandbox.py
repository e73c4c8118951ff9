"""The sandbox that runs model-written code: right code passes, wrong code fails, and code that hangs, crashes,
exits early, forks or writes outside its scratch directory fails without harming the evaluator."""

import os

from fedpt.tasks.sandbox import run

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run(SOLUTION + TESTS).passed
    wrong = run("def add(a, b):\n    return a - b\n" + TESTS)
    assert not wrong.passed and wrong.result == "failed: AssertionError"


def test_an_infinite_loop_is_a_timeout():
    outcome = run("while True:\n    pass\n", timeout=1.0)
    assert not outcome.passed and outcome.result == "timed out"


def test_a_crash_or_an_early_exit_is_a_failure_and_the_evaluator_survives():
    assert run("raise SystemExit(3)\n").result.startswith("failed")
    assert run("import os\nos._exit(0)\n" + TESTS).result.startswith("failed")  # exit 0 before the tests ran
    assert not run("import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)\n").passed
    assert not run("x = bytearray(8 << 30)\n", memory_mb=512).passed  # over the memory limit
    assert run(SOLUTION + TESTS).passed  # and the next program runs as before


def test_writing_outside_the_scratch_directory_is_refused(tmp_path):
    target = tmp_path / "evaluator-file.txt"
    outcome = run(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert not outcome.passed and "sandbox: no access" in outcome.result and not target.exists()
    assert not run(f"import os\nos.remove({str(__file__)!r})\n").passed and os.path.exists(__file__)
    assert not run(f"print(open({str(__file__)!r}).read())\n").passed  # the evaluator's files are not readable
    assert run("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n").passed


def test_processes_and_sockets_are_refused():
    for code in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['ls'])\n",
                 "import os\nos.system('echo hi')\n", "import socket\nsocket.socket()\n",
                 "import ctypes\nctypes.CDLL(None).fork()\n", "import ctypes\nctypes.CDLL('libc.so.6')\n"):
        outcome = run(code)
        assert not outcome.passed and "sandbox:" in outcome.result, (code, outcome)


def test_libraries_that_load_native_code_still_import():
    assert run("import numpy as np\nassert int(np.arange(4).sum()) == 6\n").passed
