"""The CLI in a process of its own, without paying the ~5 s import of torch and diffusers each time: children
forked from one interpreter that imported them once (multiprocessing's forkserver, started at the first use and
kept for the test run). For tests where the process is the thing tested (killed mid-write, interrupted, crashed
and restarted), not Python's start-up: ``python -m diffbatch`` and the installed entry point are run as
subprocesses in test_cli.py and test_instant_answers.py.

The child is what a shell would start, but for the imports: ``main(argv)`` of ``diffbatch.cli``, its exit code
the process's (``raise SystemExit(main())`` as in ``__main__``), SIGINT raising KeyboardInterrupt, stdout and
stderr where asked, and torch at the given thread count (as ``OMP_NUM_THREADS`` would set it). Unlike a shell's
child: its environment and working directory are the test run's when the forkserver started (a test's
``monkeypatch.setenv`` or ``chdir`` does not reach it), and it exits through ``os._exit`` (no ``atexit``
handlers). More than one thread is safe because the forkserver never runs an OpenMP region before forking."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

# what `diffbatch generate` and `diffbatch serve` import for an SD-1.5 folder, so that a child imports nothing
PRELOAD = ["diffbatch.cli", "diffbatch.engine", "diffbatch.adapters.stable_diffusion", "diffbatch.server.app",
           "diffbatch.executors.local", "transformers.models.clip.modeling_clip", "uvicorn"]
# offline, as the old subprocesses ran; transformers' import-time notices (torchvision) off, as the CLI sets them
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
_started: list[bool] = []  # the forkserver was started (the environment is set once, before any server thread)


def warm_up() -> None:
    """Start the pre-importing interpreter now (it imports in the background, ~5 s on another core): conftest
    calls this once a test that uses it is collected, so that the first ``start_cli`` does not wait for it."""
    _context()


def joined(process: multiprocessing.Process, timeout: float) -> int | None:
    """Wait for ``process`` at most ``timeout`` seconds, then kill it if it still runs (a live non-daemon child
    would hold the test run's exit); its exit code (-N: killed by signal N)."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join(10)
    return process.exitcode


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    if _started:  # (restarted by ensure_running only if it died: the environment is then the current one)
        return context
    context.set_forkserver_preload(PRELOAD)
    saved = {name: os.environ.get(name) for name in SERVER_ENV}
    os.environ.update(SERVER_ENV)  # read by the server as it starts (it imports huggingface_hub and transformers)
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    _started.append(True)
    return context


def _child(argv: list[str], stdout: str | None, stderr: str | None, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it in a process a shell starts
    _redirect(1, stdout)
    _redirect(2, stderr)
    import torch

    from diffbatch.cli import main

    torch.set_num_threads(threads)
    _thread_locked_progress_bars()
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    raise SystemExit(code)


def _redirect(fd: int, path: str | None, flags: int = os.O_APPEND) -> None:
    """File descriptor ``fd`` (1 or 2) writes to ``path`` (created if missing), or nowhere."""
    target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | flags)
    os.dup2(target, fd)
    os.close(target)


def cli_in_fork(argv: list[str], stderr: str) -> int:
    """``main(argv)`` in a child forked from the calling process, its stderr written to ``stderr``; its exit code as
    a shell reports it (an uncaught exception: its traceback on stderr and 1, as the interpreter does). For a
    ``start_function`` target (which has run no model, so no OpenMP region, before forking)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _redirect(2, stderr, os.O_TRUNC)
            from diffbatch.cli import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would, then exit 1
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def start_function(target: Callable[..., None], *args: Any) -> multiprocessing.Process:
    """``target(*args)`` in a forked process, started (``target``: a module-level function, found by name)."""
    process = _context().Process(target=_call, args=(target, *args))
    process.start()
    return process


def _call(target: Callable[..., None], *args: Any) -> None:
    _thread_locked_progress_bars()
    target(*args)


def _thread_locked_progress_bars() -> None:
    """Progress bars lock with a thread lock, not a named semaphore, which a killed (or ``os._exit``-ed) child
    leaves to multiprocessing's resource tracker: it warns of "leaked semaphore objects" at the end of the run."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def start_cli(argv: Sequence[str], stdout: Path | None = None, stderr: Path | None = None,
              threads: int = 1) -> multiprocessing.Process:
    """``diffbatch <argv>`` in a forked process, started; stdout and stderr appended to the files given (else
    discarded). ``.pid``, ``.exitcode`` (``-N``: killed by signal N), ``.join()``, ``.kill()`` as usual."""
    process = _context().Process(target=_child, args=([str(a) for a in argv], stdout and str(stdout),
                                                       stderr and str(stderr), threads))
    process.start()
    return process
