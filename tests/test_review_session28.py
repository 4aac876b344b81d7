"""Review of the Typer-free command line (cli/declare.py, cli/__init__.py) and of `inspect --stats`
in forked workers (ops/stats.py): the defects found, each held here."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

LINUX = sys.platform.startswith("linux")


def test_stats_in_forked_workers_leave_no_traceback_when_sigchld_is_ignored(tmp_path):
    """A parent that ignores SIGCHLD (some supervisors and daemons; the disposition is inherited
    across exec) makes the kernel reap the workers itself, so waitpid fails with ECHILD: the run
    must still end cleanly, not print 'Exception ignored ... ChildProcessError' on stderr."""
    if not LINUX:
        pytest.skip("workers are forked on Linux only")
    rng = np.random.default_rng(0)
    path = tmp_path / "t.safetensors"
    save_file({"a": rng.standard_normal(3 << 20, dtype=np.float32),
               "b": rng.standard_normal(3 << 20, dtype=np.float32)}, str(path))  # past one segment: forked
    proc = subprocess.run(
        [sys.executable, "-c", "from ckptsurgery.cli import main; main()", "inspect", str(path), "--stats", "--json"],
        capture_output=True, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN), timeout=120)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()[-2000:]


def test_stats_each_stats_finishes_when_the_workers_were_reaped_already(tmp_path, monkeypatch):
    """The same, in-process: each_stats run to its end with SIGCHLD ignored gives the single
    process's figures and raises nothing."""
    if not LINUX:
        pytest.skip("workers are forked on Linux only")
    from test_inspect import _stats_module_with_forks_counted

    from ckptsurgery.ops.inputs import open_input

    stats, _ = _stats_module_with_forks_counted(monkeypatch, 3)
    path = tmp_path / "t.safetensors"
    save_file({"a": np.arange(100, dtype=np.float32), "b": np.linspace(-1, 1, 64)}, str(path))
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with open_input(str(path)) as (ckpt, _):
            refs = list(ckpt.tensors.values())
            found = list(stats.each_stats(refs))
            expected = [stats.tensor_stats(t) for t in refs]
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert found == expected


def test_ctrl_c_while_a_commands_module_is_imported_exits_130_without_a_traceback(tmp_path):
    """A plain command line imports its command's module (and through it numpy, the merge
    methods, ...) before the command runs, outside Typer: Ctrl-C there must end the run as
    Ctrl-C anywhere else does (exit 130, nothing on stderr), as it did when Typer imported it."""
    code = ("import importlib, sys\n"
            "real = importlib.import_module\n"
            "def interrupted(name, *args):\n"
            "    if name.startswith('ckptsurgery.cli.'):\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *args)\n"
            "importlib.import_module = interrupted\n"
            "from ckptsurgery.cli import main\n"
            "sys.argv = ['ckptsurgery', 'inspect', 'a.pth']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=tmp_path)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()[-2000:]
    assert proc.returncode == 130, (proc.returncode, proc.stderr.decode()[-2000:])


def test_ctrl_c_just_after_a_worker_is_forked_kills_and_reaps_it(tmp_path):
    """A Ctrl-C that lands the moment fork returns, before the worker is on the list of those to
    stop, waits (SIGINT blocked) until it is: the worker is killed and reaped, never left running.
    In a process of its own: with other threads alive (the test runner's), the signal could be
    taken by one of them, which the mask of this thread does not cover."""
    if not LINUX:
        pytest.skip("workers are forked on Linux only")
    path = tmp_path / "t.safetensors"
    save_file({"a": np.arange(100, dtype=np.float32)}, str(path))
    code = f"""
import importlib, os, signal
from ckptsurgery.ops.inputs import open_input
stats = importlib.import_module("ckptsurgery.ops.stats")
stats._CHUNK, stats._SEGMENT = 5, 15
importlib.import_module("ckptsurgery.ops.options").default_jobs = lambda: 2
real_fork, children = os.fork, []
def fork_then_interrupt():
    pid = real_fork()
    if pid:
        children.append(pid)
        os.kill(os.getpid(), signal.SIGINT)
    return pid
os.fork = fork_then_interrupt
try:
    with open_input({str(path)!r}) as (ckpt, _):
        list(stats.each_stats(list(ckpt.tensors.values())))
except KeyboardInterrupt:
    pass
else:
    raise SystemExit("no KeyboardInterrupt")
assert len(children) == 1, children
try:
    os.waitpid(children[0], os.WNOHANG)
except ChildProcessError:
    print("reaped")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "reaped", (proc.stdout, proc.stderr[-2000:])
