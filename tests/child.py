"""Run Python code in a child process, for what cannot be tested in the test process:
signals, fork, process-wide limits, a fresh interpreter.

The child inherits the environment (so ``BNRS_NUM_THREADS`` etc. apply) plus ``env``; it
imports bnrs from the same interpreter. Every wait has a timeout, so a hang fails a test
instead of stopping the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap


def _command(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _environment(env: dict | None) -> dict:
    return {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}


def default_sigint() -> None:
    """``preexec_fn`` for children that must see Ctrl-C: a shell without job control
    starts background commands with SIGINT ignored, and an ignored signal stays ignored
    across exec, so Python would not install its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(code: str, *, timeout: float = 60, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` to completion; with ``check``, fail unless it exits with status 0."""
    process = start(code, env=env)
    stdout, stderr = finish(process, timeout=timeout)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"child exited with status {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def start(code: str, *, env: dict | None = None) -> subprocess.Popen:
    """Start ``code``; read its lines from ``.stdout``, then ``finish()`` it."""
    return subprocess.Popen(_command(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_environment(env),
                            preexec_fn=default_sigint)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """Wait for a started child (aborting it after ``timeout``); return stdout, stderr."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGABRT first: faulthandler (PYTHONFAULTHANDLER) prints every thread's stack.
        process.send_signal(signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        raise AssertionError(f"child still running after {timeout} s (aborted)\n"
                             f"stdout:\n{stdout}\nstderr:\n{stderr}") from None


def expect_line(process: subprocess.Popen, prefix: str) -> str:
    """The child's next line, which must start with ``prefix``."""
    line = process.stdout.readline()
    if not line.startswith(prefix):
        stdout, stderr = finish(process, timeout=10)
        raise AssertionError(f"expected a line starting {prefix!r}, got {line!r}\n"
                             f"stdout:\n{stdout}\nstderr:\n{stderr}")
    return line.strip()
