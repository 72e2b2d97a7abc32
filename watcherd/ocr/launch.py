"""How the parent starts an interpreter of the child's: the OCR child itself, the engine probe, and
`watcherd check`'s GPU probe all start the same way.

The interpreter is `ocr.python` (another venv, pinned for a model) or our own. It starts with "/"
as its working directory and without the current directory on its import path: `python -c` would
otherwise put the daemon's working directory first on sys.path, and a `runpy.py` or `json.py`
planted there would run inside the child. A relative `ocr.python` or `ocr.model` is therefore
made absolute here, against the daemon's working directory, before the interpreter moves to "/".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from watcherd.core.settings import GpuSettings, OcrSettings

# The child runs `watcherd.ocr.child.main` from this very installation. Under `ocr.python` our
# folder is appended, not prepended, so that venv's own packages win. `python -c` puts "" (the
# working directory) first on sys.path: dropped before anything is imported (`-P` would do it
# too, but not on the older interpreters `ocr.python` may name).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_PATH_SETUP = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "sys.path.append(sys.argv.pop(1))"  # argv[1] is PACKAGE_ROOT
)
CHILD_BOOTSTRAP = f"{CHILD_PATH_SETUP}; import runpy; runpy.run_module('watcherd.ocr.child.main', run_name='__main__')"
ENGINE_PROBE = f"{CHILD_PATH_SETUP}; from watcherd.ocr.engines import resolve; resolve(sys.argv[1])"
CHILD_CWD = "/"


class EngineLoadError(Exception):
    """The engine cannot be loaded: `config_error` when retrying cannot help (bad ocr.engine)."""

    def __init__(self, detail: str, *, config_error: bool):
        super().__init__(detail)
        self.config_error = config_error


def interpreter(ocr: OcrSettings) -> str:
    """`ocr.python` as given, made absolute when relative (the child starts in "/"); else ours."""
    program = ocr.python
    if not program:
        return sys.executable
    return os.path.abspath(program) if os.sep in program and not os.path.isabs(program) else program


def command(ocr: OcrSettings, code: str, *args: str) -> list[str]:
    """The child's interpreter running `code`, which starts with CHILD_PATH_SETUP: that takes
    PACKAGE_ROOT (passed here as argv[1]) onto the import path and out of argv."""
    return [interpreter(ocr), "-c", code, PACKAGE_ROOT, *args]


def environment(*, device: int | None = None, threads: int | None = None) -> dict[str, str]:
    """The daemon's environment, with the child's share of the cores and its GPU."""
    env = dict(os.environ)
    if threads:  # read as the child's libraries start: OpenMP (torch), our rapidocr engine
        env["OMP_NUM_THREADS"] = env["WATCHERD_OCR_THREADS"] = str(threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    return env


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a probe to its end in "/", its output captured as text."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=CHILD_CWD, env=env)


def start(argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start an interpreter in "/" and in a process group of its own (killpg reaches what it starts)."""
    return subprocess.Popen(argv, cwd=CHILD_CWD, start_new_session=True, **popen)


def child_spec(ocr: OcrSettings, gpu: GpuSettings, *, device: int | None, threads: int | None, stack_fd: int) -> str:
    """The OCR child's settings, as JSON for its argv: what it needs of `ocr` and `gpu`."""
    spec = {
        "engine": ocr.engine,
        "model": _absolute_model(ocr.model),
        "prompt": ocr.prompt,
        "options": ocr.options,
        "device": None if device is None else "cuda",
        "max_side_px": ocr.max_side_px,
        "max_pages": ocr.max_pages,
        "max_file_mb": ocr.max_file_mb,
        "max_file_bytes": ocr.max_file_bytes,
        "memory_max_mb": ocr.memory_max_mb,
        "clear_cache_every": gpu.clear_cache_every,
        "min_free_mb": gpu.min_free_mb,
        "max_usage_percent": gpu.max_usage_percent,
        "pdf_text": ocr.pdf_text,
        "auto_rotate": ocr.auto_rotate,
        "batch_pages": ocr.batch_pages,
        "stack_fd": stack_fd,
        "threads": threads,
    }
    return json.dumps(spec)


def _absolute_model(model: str | None) -> str | None:
    """A relative model folder that exists here, made absolute (the child starts in "/"); a hub
    id such as "deepseek-ai/DeepSeek-OCR" is left as it is."""
    if model and not os.path.isabs(model) and os.path.exists(model):
        return os.path.abspath(model)
    return model


# -- can the child's interpreter import the engine? ------------------------------------------


def _probe_problem(returncode: int, stderr: str) -> str | None:
    if returncode != 0:
        return (stderr.strip().splitlines() or ["?"])[-1]
    return None


def probe_engine(ocr: OcrSettings) -> str | None:
    """Can the child's interpreter import `ocr.engine`? None if so, else what went wrong.

    Runs in a throw-away process (the parent never imports an engine, or torch) and waits for it:
    for `watcherd check`. The daemon's reload uses `EngineProbe`, which does not wait.
    """
    argv = command(ocr, ENGINE_PROBE, ocr.engine)
    try:
        result = run(argv, timeout=ocr.load_timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ocr.python: cannot run {argv[0]}: {exc}"
    return _probe_problem(result.returncode, result.stderr)


class EngineProbe:
    """`probe_engine` without waiting: the probe process runs while the main loop goes on.

    A thread waits for the process (up to `ocr.load_timeout_s`, then kills it) and calls
    `on_done` — the loop's wake-up — when the answer is there; `done` and `problem` hold it.
    Importing a model's package can take minutes, far longer than the systemd watchdog allows
    the loop to stand still.
    """

    def __init__(self, ocr: OcrSettings, *, on_done: Callable[[], None] = lambda: None):
        self.ocr = ocr
        self.done = False
        self.problem: str | None = None
        self._on_done = on_done
        argv = command(ocr, ENGINE_PROBE, ocr.engine)
        try:
            self._proc: subprocess.Popen[str] | None = start(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            self._proc = None
            self._finish(f"ocr.python: cannot run {argv[0]}: {exc.strerror or exc}")
            return
        threading.Thread(target=self._wait, name="engine-probe", daemon=True).start()

    def _wait(self) -> None:
        assert self._proc is not None
        try:
            _, stderr = self._proc.communicate(timeout=self.ocr.load_timeout_s)
        except subprocess.TimeoutExpired:
            self.cancel()
            self._proc.communicate()
            self._finish(
                f"importing {self.ocr.engine} took longer than ocr.load_timeout_s ({self.ocr.load_timeout_s:g} s)"
            )
            return
        self._finish(_probe_problem(self._proc.returncode, stderr or ""))

    def _finish(self, problem: str | None) -> None:
        self.problem = problem
        self.done = True
        self._on_done()

    def cancel(self) -> None:
        """Kill the probe (a newer reload, or the daemon stopping)."""
        if self._proc is not None and self._proc.poll() is None:
            killpg(self._proc.pid)


def killpg(pid: int) -> None:
    """SIGKILL the process group of an interpreter `start`ed, if it is still there."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
