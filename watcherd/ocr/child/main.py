"""The OCR child: loads the engine once, then OCRs the files of each request until told to stop.

It is started as a fresh interpreter (`python -m watcherd.ocr.child.main`), never forked from a process
that may hold CUDA state, in its own process group so the parent can SIGKILL it and anything it
started. It talks to the parent over two dedicated pipes with length-framed JSON messages; its
stdout goes to stderr, because models print (DeepSeek-OCR streams its text to stdout).

Text that leaves the child is valid UTF-8: an engine's lone surrogates become U+FFFD, counted in
the page's `replaced_characters`. With `ocr.memory_max_mb` the child runs under RLIMIT_DATA, so a
page that needs more ends as a MemoryError here (or the child's death), never the host's memory.
On SIGUSR1 faulthandler writes every thread's Python stack to a pipe the parent reads: on a page
timeout the parent asks for it before the SIGKILL, so the error says where the model hung.

This module is the process (its entry point, the engine's load, the request loop); which pages
go into each engine call is batch.py's, what is said and written about them report.py's.

Every reply carries the request's id. The child never publishes outputs or moves files: the
searchable PDF, hOCR and ALTO it writes go to scratch files in the state folder (never the inbox)
named by the parent, fsync'ed before `done`, and the parent publishes them. If the child is killed
at any instant, the parent still holds everything it needs to finish the file (it reads it again).

Messages, child → parent:
  ready {engine, model, device, load_time, pid, batch_pages} | load_failed {detail, config_error}
  pages {id, count, sha256, kind, file}              (the file opened: its page count and inode)
  page_start {id, page, pages?}                      (a page, or a batch of `pages`: the clock restarts)
  page {id, page, text, processing_time, size, resized_from, source, rotated?, lines?,
        batch_pages?, batch_time?}
  rendering {id}                                     (writing the PDF/hOCR/ALTO: the clock restarts)
  done {id, gpu_info_before, gpu_info_after, rendered, render_errors, next_page?}
                                                     (next_page: a turn of a long file is over)
  failed {id, code, detail, sha256}
  deferred {id, gpu_info, sha256, reason, detail}   (try again later: too little GPU memory even
                                    after clearing, reason "vram"; or the engine raised
                                    EngineUnavailable, reason "engine_unavailable")
  cleared {files_done, before, after}                (the GPU cache was cleared)
parent → child: ocr {files: [{id, path, render, first_page, earlier}], solo, turn_pages}
                (several files only for an engine with ocr_batch: their pages share engine calls;
                 another such `ocr` may come while one is read, and joins it)
                | idle {} (queue drained: clear the cache) | exit {}
"""

from __future__ import annotations

import collections
import ctypes
import faulthandler
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from watcherd.ocr import protocol
from watcherd.ocr.child.batch import Batcher
from watcherd.ocr.engines import EngineConfigError, EngineNotFound, resolve

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
    """The child process's side of the pipes: it loads the engine, says `ready`, then reads the
    parent's requests until `exit` (or the pipe closes) and hands each `ocr` to a Batcher."""

    def __init__(self, conn_in: Connection, conn_out: Connection, spec: dict[str, Any]):
        self.conn_in = conn_in
        self.conn_out = conn_out
        self.spec = spec
        self.engine: Any = None
        self.batcher: Batcher | None = None  # once the engine is loaded
        self.later: collections.deque[protocol.Request] = collections.deque()  # read while busy, not `ocr`

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
        batch_pages = 1  # pages per engine call: ocr.batch_pages for engines with ocr_batch
        if callable(getattr(self.engine, "ocr_batch", None)):
            batch_pages = max(1, int(self.spec.get("batch_pages", 1)))
        orientation = None
        if self.spec.get("auto_rotate"):
            try:
                from watcherd.ocr.child.orientation import OrientationDetector

                orientation = OrientationDetector()
            except Exception as exc:  # noqa: BLE001 - reported like an engine that cannot load
                traceback.print_exc()
                self.send("load_failed", detail=f"page orientation (ocr.auto_rotate): {exc}", config_error=False)
                return False
        self.batcher = Batcher(
            self.engine, orientation, self.spec, batch_pages=batch_pages, send=self.send, top_ups=self._top_ups
        )
        self.send(
            "ready",
            engine=self.spec["engine"],
            model=getattr(self.engine, "model", None) or self.spec.get("model"),
            device=self.spec.get("device"),
            load_time=round(time.monotonic() - started, 3),
            pid=os.getpid(),
            batch_pages=batch_pages,
        )
        return True

    def serve(self) -> None:
        """The request loop, once loaded: until `exit`, or until the parent closes the pipe."""
        assert self.batcher is not None
        while True:
            if self.later:
                message = self.later.popleft()
            else:
                try:
                    message = protocol.decode_request(self.conn_in.recv_bytes())
                except EOFError:
                    return  # the parent closed the pipe: we are done
            if isinstance(message, protocol.OcrRequest):
                self.batcher.ocr(message)
            elif isinstance(message, protocol.IdleRequest):
                self.batcher.clear_cache()
            elif isinstance(message, protocol.ExitRequest):
                return

    def _top_ups(self) -> Iterator[protocol.FileRequest]:
        """The files of the `ocr` requests the parent has sent while one is read, as they are
        read; any other message waits in `later` for the request loop."""
        while self.conn_in.poll():
            try:
                message = protocol.decode_request(self.conn_in.recv_bytes())
            except EOFError:
                return  # the parent is gone; serve() finds out next
            if not isinstance(message, protocol.OcrRequest):
                self.later.append(message)
                continue
            yield from message.files


def _set_threads(threads: int | None) -> None:
    """`ocr.workers` > 1: this child's share of the cores. OMP_NUM_THREADS (set by the parent)
    covers OpenMP and onnxruntime's rapidocr engine reads WATCHERD_OCR_THREADS; torch keeps its own
    intra-op pool, set here if the engine loaded torch."""
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


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
