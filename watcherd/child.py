"""The OCR child: loads the engine once, then OCRs one file per request until told to stop.

It is started as a fresh interpreter (`python -m watcherd.child`), never forked from a process
that may hold CUDA state, in its own process group so the parent can SIGKILL it and anything it
started. It talks to the parent over two dedicated pipes with length-framed JSON messages; its
stdout goes to stderr, because models print (DeepSeek-OCR streams its text to stdout).

Text that leaves the child is valid UTF-8: an engine's lone surrogates become U+FFFD, counted in
the page's `replaced_characters`. With `ocr.memory_max_mb` the child runs under RLIMIT_DATA, so a
page that needs more ends as a MemoryError here (or the child's death), never the host's memory.
On SIGUSR1 faulthandler writes every thread's Python stack to a pipe the parent reads: on a page
timeout the parent asks for it before the SIGKILL, so the error says where the model hung.

Every reply carries the request's id. The child never writes outputs or moves files: if it is
killed at any instant, the parent still holds everything it needs to finish the file.

Messages, child → parent:
  ready {engine, model, device, load_time, pid}      | load_failed {detail, config_error}
  pages {id, count, sha256, kind}                    (the file opened; the clock restarts)
  page_start {id, page}                              (the parent restarts the page clock)
  page {id, page, text, processing_time, size, resized_from}
  done {id, gpu_info_before, gpu_info_after}         | failed {id, code, detail, sha256}
  deferred {id, gpu_info, sha256, reason, detail}   (try again later: too little GPU memory even
                                    after clearing, reason "vram"; or the engine raised
                                    EngineUnavailable, reason "engine_unavailable")
  cleared {files_done, before, after}                (the GPU cache was cleared)
parent → child: ocr {id, path} | idle {} (queue drained: clear the cache) | exit {}
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import gpu, protocol
from .engines import EngineConfigError, EngineNotFound, EngineUnavailable, as_page, resolve
from .pages import Document, InputError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """If the daemon is SIGKILLed, take the child (and its GPU memory) down with it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Child:
    def __init__(self, conn_in: Connection, conn_out: Connection, spec: dict[str, Any]):
        self.conn_in = conn_in
        self.conn_out = conn_out
        self.spec = spec
        self.engine: Any = None
        self.files_done = 0

    def send(self, op: str, **fields: Any) -> None:
        self.conn_out.send_bytes(json.dumps({"op": op, **fields}).encode())

    def load(self) -> bool:
        started = time.monotonic()
        try:
            engine_class = resolve(self.spec["engine"])
        except EngineNotFound as exc:
            self.send("load_failed", detail=str(exc), config_error=True)
            return False
        try:
            self.engine = engine_class(
                model=self.spec.get("model"),
                prompt=self.spec.get("prompt"),
                device=self.spec.get("device"),
                **self.spec.get("options", {}),
            )
        except Exception as exc:  # noqa: BLE001 - any engine failure is reported, then we exit
            detail = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            self.send("load_failed", detail=detail, config_error=isinstance(exc, (TypeError, EngineConfigError)))
            return False
        _set_threads(self.spec.get("threads"))
        self.send(
            "ready",
            engine=self.spec["engine"],
            model=getattr(self.engine, "model", None) or self.spec.get("model"),
            device=self.spec.get("device"),
            load_time=round(time.monotonic() - started, 3),
            pid=os.getpid(),
        )
        return True

    def serve(self) -> None:
        while True:
            try:
                message = json.loads(self.conn_in.recv_bytes())
            except EOFError:
                return  # the parent closed the pipe: we are done
            op = message["op"]
            if op == "ocr":
                self.ocr_file(message["id"], message["path"])
            elif op == "idle":
                self.clear_cache()
            elif op == "exit":
                return

    def memory_shortage(self) -> dict[str, Any] | None:
        """None if the GPU has room for a page (or there is no GPU); else the figures that say
        it has not, read again after clearing our own cache (DESIGN §7)."""
        info = self.gpu_info()
        if not self._short(info):
            return None
        self.clear_cache()
        info = self.gpu_info()
        return info if self._short(info) else None

    def _short(self, info: dict[str, Any]) -> bool:
        if not info.get("available"):
            return False
        return info["free_mb"] < self.spec["min_free_mb"] or info["usage_percent"] > self.spec["max_usage_percent"]

    def gpu_info(self) -> dict[str, Any]:
        """GPU figures; a failure to read them is reported in the figures, never fatal."""
        try:
            return gpu.info(self.engine)
        except Exception as exc:  # noqa: BLE001 - an engine's gpu_info() or a CUDA query
            return {"available": False, "error": f"{type(exc).__name__}: {exc}"}

    def clear_cache(self) -> None:
        """Give cached GPU memory back (the engine's own clear_cache, else torch's), and say what it freed."""
        before = self.gpu_info()
        try:
            gpu.clear_cache(self.engine)
        except Exception:  # noqa: BLE001 - a failed clear is worth a traceback, not a dead child
            traceback.print_exc()
        after = self.gpu_info()
        self.send("cleared", files_done=self.files_done, before=before, after=after)

    def ocr_file(self, request_id: int, path: str) -> None:
        sha256 = None
        try:
            with open(path, "rb", opener=_open_nofollow) as f:
                # read(n) allocates n bytes first: ask for what the file holds (plus one, to see
                # it grow past the limit), not for max_file_bytes, which RLIMIT_DATA may not allow.
                st = os.fstat(f.fileno())
                size = st.st_size
                data = f.read(min(size, self.spec["max_file_bytes"]) + 1)
            file = [st.st_dev, st.st_ino]
            if len(data) > self.spec["max_file_bytes"]:
                raise InputError("too_large", f"larger than ocr.max_file_mb ({self.spec['max_file_mb']:g} MB)")
            sha256 = hashlib.sha256(data).hexdigest()
            document = Document(data, max_side_px=self.spec["max_side_px"], max_pages=self.spec["max_pages"])
            del data
            # The inode read: the parent checks it is the one it claimed (DESIGN §9).
            self.send("pages", id=request_id, count=len(document), sha256=sha256, kind=document.kind, file=file)
            before = self.gpu_info()
            for page in document:
                shortage = self.memory_shortage()
                if shortage is not None:
                    self.send("deferred", id=request_id, gpu_info=shortage, sha256=sha256)
                    return
                self.send("page_start", id=request_id, page=page.number)
                started = time.monotonic()
                try:
                    text = self.engine.ocr(page.image)
                except EngineUnavailable as exc:  # its server is down or busy: the whole file waits
                    reason = "engine_unavailable"
                    self.send("deferred", id=request_id, gpu_info=before, sha256=sha256, reason=reason, detail=str(exc))
                    return
                except Exception as exc:  # noqa: BLE001 - MemoryError included: the model's failure
                    traceback.print_exc()
                    note = self._memory_note() if isinstance(exc, MemoryError) else ""
                    raise _EngineError(f"{type(exc).__name__}: {exc}{note}") from None
                try:
                    text = as_page(text).full_text  # positions: published from issue #12 on
                except TypeError as exc:
                    raise _EngineError(str(exc)) from None
                text, replaced = protocol.valid_text(text)
                extra = {"replaced_characters": replaced} if replaced else {}
                self.send(
                    "page",
                    id=request_id,
                    page=page.number,
                    text=text,
                    processing_time=round(time.monotonic() - started, 3),
                    size=list(page.size),
                    resized_from=list(page.resized_from) if page.resized_from else None,
                    **extra,
                )
            self.files_done += 1
            if self.files_done % self.spec["clear_cache_every"] == 0:
                self.clear_cache()
            self.send("done", id=request_id, gpu_info_before=before, gpu_info_after=self.gpu_info())
        except InputError as exc:
            self.send("failed", id=request_id, code=exc.code, detail=exc.detail, sha256=sha256)
        except _EngineError as exc:
            self.send("failed", id=request_id, code="engine_error", detail=str(exc), sha256=sha256)
        except OSError as exc:
            self.send("failed", id=request_id, code="unreadable", detail=f"{exc.strerror or exc}", sha256=sha256)
        except MemoryError:
            detail = f"out of memory decoding it{self._memory_note()}"
            self.send("failed", id=request_id, code="too_large", detail=detail, sha256=sha256)
        except Exception as exc:  # noqa: BLE001 - a decoder bug on a hostile file (bad EXIF...) costs the file only
            traceback.print_exc()
            detail = f"{type(exc).__name__}: {exc}"
            self.send("failed", id=request_id, code="unreadable", detail=detail, sha256=sha256)

    def _memory_note(self) -> str:
        limit = self.spec.get("memory_max_mb")
        return f" (memory limit ocr.memory_max_mb = {limit:g} MB exceeded)" if limit else ""


class _EngineError(Exception):
    pass


def _set_threads(threads: int | None) -> None:
    """`ocr.workers` > 1: this child's share of the cores. OMP_NUM_THREADS (set by the parent)
    covers OpenMP and onnxruntime's rapidocr engine reads WATCHERD_OCR_THREADS; torch keeps its own
    intra-op pool, set here if the engine loaded torch."""
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _limit_memory(megabytes: float | None) -> None:
    """RLIMIT_DATA, not RLIMIT_AS: it counts private writable memory (heap, anonymous mappings,
    thread stacks) but not address space reserved without access, which CUDA's initialisation
    takes by the tens of GB and RLIMIT_AS would count. rapidocr on CPU needs about 600 MB."""
    if megabytes:
        limit = int(megabytes * 1024 * 1024)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main() -> None:
    _die_with_parent()
    fd_in, fd_out = int(sys.argv[1]), int(sys.argv[2])
    spec = json.loads(sys.argv[3])
    if spec.get("stack_fd") is not None:  # a page timeout: the parent asks where we are
        # Non-blocking: should the pipe be full (SIGUSR1 sent by hand, again and again), the dump
        # is cut short instead of blocking the child inside the signal handler.
        os.set_blocking(spec["stack_fd"], False)
        faulthandler.register(signal.SIGUSR1, file=spec["stack_fd"], all_threads=True)
    _limit_memory(spec.get("memory_max_mb"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    child = Child(Connection(fd_in, writable=False), Connection(fd_out, readable=False), spec)
    if not child.load():
        sys.exit(3)
    child.serve()
    close = getattr(child.engine, "close", None)
    if close is not None:
        close()


if __name__ == "__main__":
    main()
