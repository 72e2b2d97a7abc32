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
import hashlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from watcherd.core.records import InputError
from watcherd.core.text import Line, Word, as_page, box_from_points
from watcherd.ocr import gpu, protocol
from watcherd.ocr.child.decode import PDF_DPI, Document, Page
from watcherd.ocr.engines import EngineConfigError, EngineNotFound, EngineUnavailable, resolve

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
        self.orientation: Any = None  # the page-orientation classifier, with ocr.auto_rotate
        self.files_done = 0
        self.batch_pages = 1  # pages per engine call: ocr.batch_pages for engines with ocr_batch
        self.later: collections.deque[dict[str, Any]] = collections.deque()  # read while busy, not `ocr`

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
        if callable(getattr(self.engine, "ocr_batch", None)):
            self.batch_pages = max(1, int(self.spec.get("batch_pages", 1)))
        if self.spec.get("auto_rotate"):
            try:
                from watcherd.ocr.child.orientation import OrientationDetector

                self.orientation = OrientationDetector()
            except Exception as exc:  # noqa: BLE001 - reported like an engine that cannot load
                traceback.print_exc()
                self.send("load_failed", detail=f"page orientation (ocr.auto_rotate): {exc}", config_error=False)
                return False
        self.send(
            "ready",
            engine=self.spec["engine"],
            model=getattr(self.engine, "model", None) or self.spec.get("model"),
            device=self.spec.get("device"),
            load_time=round(time.monotonic() - started, 3),
            pid=os.getpid(),
            batch_pages=self.batch_pages,
        )
        return True

    def serve(self) -> None:
        while True:
            if self.later:
                message = self.later.popleft()
            else:
                try:
                    message = json.loads(self.conn_in.recv_bytes())
                except EOFError:
                    return  # the parent closed the pipe: we are done
            op = message["op"]
            if op == "ocr":
                self.ocr(message)
            elif op == "idle":
                self.clear_cache()
            elif op == "exit":
                return

    def memory_shortage(self) -> dict[str, Any] | None:
        """None if the GPU has room for a page (or there is no GPU); else the figures that say
        it has not, read again after clearing our own cache (design §7)."""
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

    def ocr(self, request: dict[str, Any]) -> None:
        """One `ocr` request: one file, or several when the engine reads pages in batches (the
        parent keeps about three batches' worth here, and more files join while it runs). Pages
        of the files share engine calls, `ocr.batch_pages` at a time, in the files' order: a batch
        may end one file and start the next, so a GPU is fed while one-page scans queue. Each file
        is read from `first_page`, at most `turn_pages` pages when it has more, and finished
        (rendered, `done`) as soon as its last page is read; a file that fails costs only itself."""
        per_call = 1 if request.get("solo") else self.batch_pages
        turn = int(request.get("turn_pages") or 0)
        files = [f for f in (self._open(spec, per_call, turn) for spec in request["files"]) if f is not None]
        ahead: _Prefetch | None = None  # the next batch, decoded while the engine reads this one
        while files:
            if ahead is not None:
                batch, decoded, ahead = ahead.batch, ahead.decoded, None
            else:
                self._more(files, per_call, turn)
                batch, decoded = self._next_batch(files, per_call, []), None
            if batch:
                shortage = self.memory_shortage()  # the VRAM guard, before every batch
                if shortage is not None:
                    self._defer(files, gpu_info=shortage)
                    return
                started = self._start(batch)
                prepared = self._prepared(batch, decoded)
                if len(prepared) > 1:  # a timeout now re-reads every file alone: a hang in the
                    self._more(files, per_call, turn)  # prefetch is found then
                    following = self._next_batch(files, per_call, batch)
                    ahead = _Prefetch(self, following) if following else None
                try:
                    self._read(prepared, started)
                except EngineUnavailable as exc:  # its server is down or busy: every file waits
                    if ahead is not None:
                        ahead.wait()
                    self._defer(files, gpu_info=self.gpu_info(), reason="engine_unavailable", detail=str(exc))
                    return
                if ahead is not None:
                    ahead.wait()  # before anything else touches the documents (pdfium is not thread-safe)
            files = [f for f in files if not self._finished(f, ahead)]

    def _defer(self, files: list[_File], **fields: Any) -> None:
        """Every file of the request waits: too little GPU memory, or the engine's server is unavailable."""
        for f in files:
            if not f.failed:
                self.send("deferred", id=f.id, sha256=f.sha256, **fields)

    def _more(self, files: list[_File], per_call: int, turn: int) -> None:
        """Files the parent sent while these were being read (it keeps a batch engine fed: the
        next files arrive before the last batch ends), opened and added behind the others."""
        while self.conn_in.poll():
            try:
                message = json.loads(self.conn_in.recv_bytes())
            except EOFError:
                return  # the parent is gone; serve() finds out next
            if message["op"] != "ocr":
                self.later.append(message)
                continue
            files += [f for f in (self._open(spec, per_call, turn) for spec in message["files"]) if f is not None]

    def _open(self, spec: dict[str, Any], per_call: int, turn: int) -> _File | None:
        """Read a file of the request, hash it and count its pages (`pages`), or say why not (`failed`)."""
        sha256 = None
        try:
            with open(spec["path"], "rb", opener=_open_nofollow) as f:
                # read(n) allocates n bytes first: ask for what the file holds (plus one, to see
                # it grow past the limit), not for max_file_bytes, which RLIMIT_DATA may not allow.
                st = os.fstat(f.fileno())
                data = f.read(min(st.st_size, self.spec["max_file_bytes"]) + 1)
            if len(data) > self.spec["max_file_bytes"]:
                raise InputError("too_large", f"larger than ocr.max_file_mb ({self.spec['max_file_mb']:g} MB)")
            sha256 = hashlib.sha256(data).hexdigest()
            document = Document(data, max_side_px=self.spec["max_side_px"], max_pages=self.spec["max_pages"])
            render = spec.get("render") or {}
            original = data if "pdf" in (render.get("formats") or {}) else None  # the PDF is built around it
            del data
            # The inode read: the parent checks it is the one it claimed (design §9).
            file = [st.st_dev, st.st_ino]
            self.send("pages", id=spec["id"], count=len(document), sha256=sha256, kind=document.kind, file=file)
            first = int(spec.get("first_page") or 0)
            stop = min(len(document), first + max(turn, per_call)) if turn else len(document)
            opened = _File(
                spec["id"], spec["path"], render, document, sha256, original, first, first, stop, self.gpu_info()
            )
            if first:  # a later turn: what the earlier ones read, for the PDF/hOCR/ALTO
                opened.rendered = [_from_report(page, document) for page in spec.get("earlier") or []]
            return opened
        except Exception as exc:  # noqa: BLE001 - a hostile file costs itself only (_failure says how)
            code, detail = self._failure(exc)
            self.send("failed", id=spec["id"], code=code, detail=detail, sha256=sha256)
            return None

    def _fail(self, f: _File, exc: BaseException) -> None:
        if not f.failed:
            f.failed = True
            code, detail = self._failure(exc)
            self.send("failed", id=f.id, code=code, detail=detail, sha256=f.sha256)

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """The error code and detail for what went wrong with a file."""
        if isinstance(exc, InputError):
            return exc.code, exc.detail
        if isinstance(exc, _EngineError):
            return "engine_error", str(exc)
        if isinstance(exc, OSError):
            return "unreadable", f"{exc.strerror or exc}"
        if isinstance(exc, MemoryError):
            return "too_large", f"out of memory decoding it{self._memory_note()}"
        traceback.print_exception(exc)  # a decoder bug on a hostile file (bad EXIF...)
        return "unreadable", f"{type(exc).__name__}: {exc}"

    def _next_batch(
        self, files: list[_File], per_call: int, unread: list[tuple[_File, int]]
    ) -> list[tuple[_File, int]]:
        """The next pages for the engine, up to `per_call`, in the files' order. Pages with a text
        layer of their own are reported on the way, without the engine (and never out of their
        file's order: such a page waits while pages before it are in this batch or `unread`)."""
        batch: list[tuple[_File, int]] = []
        alone = per_call > 1 and sum(not f.failed for f in files) == 1
        for f in files:
            while not f.failed and len(batch) < per_call:
                if f.next >= f.stop and not (alone and f.go_on()):
                    break
                try:
                    layer = self._text_layer(f.document, f.next, f.layers)
                    if layer is None:
                        batch.append((f, f.next))
                    elif any(g is f for g, _ in batch + unread):
                        break
                    else:  # born-digital (or OCR'd before): no engine, no GPU
                        f.rendered.append(self._layer_page(f.id, f.document, f.next, layer))
                except Exception as exc:  # noqa: BLE001 - a hostile PDF's text layer
                    self._fail(f, exc)
                    break
                f.next += 1
            if len(batch) == per_call:
                break
        return batch

    def _finished(self, f: _File, ahead: _Prefetch | None) -> bool:
        """Is the file's part of the request over? Then its turn ends (`done` with `next_page`),
        or its PDF/hOCR/ALTO are written and it is `done`. The cache is cleared every
        `clear_cache_every` files, between batches."""
        if f.failed:
            return True
        if f.next < f.stop or (ahead is not None and any(g is f for g, _ in ahead.batch)):
            return False
        if f.stop < len(f.document):  # other files' turn: come back for the rest
            self.send("done", id=f.id, next_page=f.stop, gpu_info_before=f.before, gpu_info_after={})
            return True
        try:
            written, errors = self._render(f)
        except Exception as exc:  # noqa: BLE001 - costs this file only
            self._fail(f, exc)
            return True
        self.files_done += 1
        if self.files_done % self.spec["clear_cache_every"] == 0:
            self.clear_cache()
        after = self.gpu_info()
        self.send(
            "done", id=f.id, gpu_info_before=f.before, gpu_info_after=after, rendered=written, render_errors=errors
        )
        return True

    def _text_layer(self, document: Document, index: int, seen: dict[int, Any]) -> Any:
        """The text layer of PDF page `index` when it has one and ocr.pdf_text says use it."""
        if document.kind != "pdf" or self.spec.get("pdf_text") != "use":
            return None
        if index not in seen:
            seen[index] = document.text_layer(index)
        return seen[index]

    def _layer_page(self, request_id: int, document: Document, index: int, layer: Any) -> tuple[Any, ...]:
        self.send("page_start", id=request_id, page=index + 1)
        started = time.monotonic()
        width, height = document.nominal_size(index)
        return self._report(
            request_id,
            index + 1,
            layer.full_text,
            tuple(layer.lines),
            size=(width, height),
            resized_from=None,
            original=(width, height),
            dpi=float(PDF_DPI),
            source="pdf_text",
            rotated=None,
            timing={"processing_time": round(time.monotonic() - started, 3)},
        )

    def _start(self, batch: list[tuple[_File, int]]) -> float:
        """Tell the parent a batch starts (its deadline covers the whole call): each file in it
        gets a `page_start` with its first page here and the batch's size."""
        count = len(batch)
        first_pages: dict[_File, int] = {}  # file → its first page in the batch, in the batch's order
        for f, index in batch:
            first_pages.setdefault(f, index)
        for f, index in first_pages.items():
            self.send("page_start", id=f.id, page=index + 1, **({"pages": count} if count > 1 else {}))
        return time.monotonic()

    def _decode(self, f: _File, index: int) -> tuple[Page, int | None, Any] | Exception:
        """A page as the engine sees it (turned upright with ocr.auto_rotate), or what stopped it.
        Sends nothing: it also runs on the prefetch thread."""
        try:
            page = f.document.page(index)
            rotated = self.orientation.detect(page.image) if self.orientation is not None else None
            return page, rotated, upright(page.image, rotated) if rotated else page.image
        except Exception as exc:  # noqa: BLE001 - the page's decoder, on a hostile file
            return exc

    def _prepared(self, batch: list[tuple[_File, int]], decoded: list[Any] | None) -> list[tuple[Any, ...]]:
        """The batch's pages decoded (here, or already by the prefetch thread); a page that
        cannot be decoded fails its file, and that file's other pages leave the batch."""
        prepared = []
        for n, (f, index) in enumerate(batch):
            if f.failed:
                continue
            got = decoded[n] if decoded is not None else self._decode(f, index)
            if isinstance(got, Exception):
                self._fail(f, got)
            else:
                prepared.append((f, *got))
        return [p for p in prepared if not p[0].failed]

    def _read(self, prepared: list[tuple[Any, ...]], started: float) -> None:
        """OCR decoded pages in one engine call: `ocr_batch` for several, `ocr` for one, and
        report each with its boxes mapped back to the original page's pixels. An engine failure
        on pages of several files is narrowed down a page at a time, so that only the file at
        fault fails."""
        if not prepared:
            return
        images = [image for _, _, _, image in prepared]
        results: list[Any]
        try:
            results = self._call(images)
        except _EngineError as exc:
            if len({id(f) for f, _, _, _ in prepared}) == 1:
                self._fail(prepared[0][0], exc)
                return
            results = []
            for f, page, _, image in prepared:  # which file's page was it? Each alone
                self.send("page_start", id=f.id, page=page.number)
                try:
                    results += self._call([image]) if not f.failed else [None]
                except _EngineError as alone:
                    self._fail(f, alone)
                    results.append(None)
        wall = time.monotonic() - started
        # A page's share of its batch, and the batch's wall time: honest per-page figures.
        timing: dict[str, Any] = {"processing_time": round(wall / len(prepared), 3)}
        if len(prepared) > 1:
            timing.update(batch_pages=len(prepared), batch_time=round(wall, 3))
        for (f, page, rotated, image), result in zip(prepared, results, strict=True):
            if f.failed or result is None:
                continue
            try:
                text = result.full_text
                lines = tuple(
                    _to_original(line, rotated or 0, image.size, page) for line in result.lines if _finite(line.box)
                )
            except (TypeError, ValueError, IndexError) as exc:
                self._fail(f, _EngineError(f"engine returned positions that are not boxes: {exc}"))
                continue
            f.rendered.append(
                self._report(
                    f.id,
                    page.number,
                    text,
                    lines,
                    size=page.size,
                    resized_from=page.resized_from,
                    original=page.original_size,
                    dpi=page.dpi,
                    source="ocr",
                    rotated=rotated,
                    timing=timing,
                )
            )

    def _call(self, images: list[Any]) -> list[Any]:
        """The engine on these pages: its answers as PageText, or _EngineError saying what failed.
        EngineUnavailable (its server is down or busy) passes through: the files wait."""
        try:
            if len(images) > 1:
                answers = list(self.engine.ocr_batch(images))
                if len(answers) != len(images):
                    raise _EngineError(f"ocr_batch returned {len(answers)} pages for {len(images)}")
            else:
                answers = [self.engine.ocr(images[0])]
            return [as_page(answer) for answer in answers]
        except (_EngineError, EngineUnavailable):
            raise
        except TypeError as exc:  # as_page: neither str nor PageText
            raise _EngineError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - MemoryError included: the model's failure
            traceback.print_exc()
            note = self._memory_note() if isinstance(exc, MemoryError) else ""
            raise _EngineError(f"{type(exc).__name__}: {exc}{note}") from None

    def _report(
        self,
        request_id: int,
        number: int,
        text: str,
        lines: tuple[Line, ...],
        *,
        size: tuple[int, int],
        resized_from: tuple[int, int] | None,
        original: tuple[int, int],
        dpi: float,
        source: str,
        rotated: int | None,
        timing: dict[str, Any],
    ) -> tuple[Any, ...]:
        """Send one page to the parent; return what the renderers need of it."""
        text, replaced = protocol.valid_text(text)
        extra: dict[str, Any] = {"replaced_characters": replaced} if replaced else {}
        if rotated is not None:
            extra["rotated"] = rotated
        if lines:
            extra["lines"] = [_line_json(line) for line in lines]
        self.send(
            "page",
            id=request_id,
            page=number,
            text=text,
            size=list(size),
            resized_from=list(resized_from) if resized_from else None,
            source=source,
            **timing,
            **extra,
        )
        return (number, original[0], original[1], dpi, lines, text, source)  # a render.RenderedPage's fields

    def _render(self, f: _File) -> tuple[list[str], dict[str, str]]:
        """Write the searchable PDF, hOCR and ALTO asked for to their scratch files in the state
        folder (trusted: never inside the inbox), durably, for the parent to publish. A format
        that cannot be written is reported, not fatal: the text and the JSON are worth having."""
        render = f.render
        targets: dict[str, str] = render.get("formats") or {}
        if not targets:
            return [], {}
        from watcherd.outputs.render import RenderedPage, alto, hocr, write_pdf

        pages = [RenderedPage(*fields) for fields in f.rendered]
        self.send("rendering", id=f.id)
        name = os.path.basename(f.path)
        original, kind = f.original, f.document.kind
        written, errors = [], {}
        for fmt, target in targets.items():
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with open(fd, "wb") as out:
                    if fmt == "pdf":
                        assert original is not None and kind is not None
                        write_pdf(out, data=original, kind=kind, pages=pages, pdfa=bool(render.get("pdfa")))
                    elif fmt == "hocr":
                        out.write(hocr(pages, title=name))
                    else:
                        out.write(alto(pages, filename=name))
                    out.flush()
                    os.fsync(out.fileno())
                written.append(fmt)
            except Exception as exc:  # noqa: BLE001 - a renderer's failure costs that output only
                traceback.print_exc()
                errors[fmt] = f"{type(exc).__name__}: {exc}"[:500]
        if written:
            folder = os.open(os.path.dirname(next(iter(targets.values()))), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return written, errors

    def _memory_note(self) -> str:
        limit = self.spec.get("memory_max_mb")
        return f" (memory limit ocr.memory_max_mb = {limit:g} MB exceeded)" if limit else ""


class _EngineError(Exception):
    pass


class _Prefetch:
    """The next batch's pages decoded on a thread of their own while the engine reads the current
    batch, so that the engine is not kept waiting by the decoder (a PDF page rendered at 200 dpi,
    a PNG inflated, the orientation model). Only after a batch of several pages: should the
    decoder hang, the parent's timeout then re-reads every file alone, without prefetching."""

    def __init__(self, child: Child, batch: list[tuple[_File, int]]):
        self.batch = batch
        self.decoded: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(child,), name="watcherd-prefetch", daemon=True)
        self._thread.start()

    def _run(self, child: Child) -> None:
        self.decoded = [child._decode(f, index) for f, index in self.batch]

    def wait(self) -> None:
        self._thread.join()


@dataclass(eq=False)
class _File:
    """A file of an `ocr` request, open: where its turn stands and what it has read so far."""

    id: int  # its request id: every message about it carries it
    path: str
    render: dict[str, Any]  # {formats: {fmt: scratch path}, pdfa}
    document: Document
    sha256: str
    original: bytes | None  # its bytes, when the searchable PDF is built around them
    first: int  # the first page of this turn (0-based)
    next: int  # the next page to read
    stop: int  # where this turn ends (exclusive): the page count, or earlier for a long file
    before: dict[str, Any]  # GPU figures as it was opened
    rendered: list[tuple[Any, ...]] = field(default_factory=list)  # its pages, for the renderers
    layers: dict[int, Any] = field(default_factory=dict)  # text layers looked at
    failed: bool = False  # `failed` was sent: nothing more about it

    def go_on(self) -> bool:
        """Its turn is over but it is alone in a batch engine's request: nothing else waits (the
        parent sends a batch engine every file it queues), so the next turn follows at once,
        in full batches, without reopening the file. False if it has no more pages."""
        if self.stop >= len(self.document):
            return False
        length = self.stop - self.first  # a turn's length, so a newcomer waits one turn at most
        self.first, self.stop = self.stop, min(len(self.document), self.stop + length)
        return True


def upright(image: Any, rotated: int) -> Any:
    from watcherd.ocr.child.orientation import upright as turn

    return turn(image, rotated)


def _to_original(line: Line, rotated: int, seen: tuple[int, int], page: Page) -> Line:
    """A line found on the image the engine saw (turned upright, maybe shrunk) in the pixels of
    the original page, with its words."""
    scale_x = page.original_size[0] / page.size[0]
    scale_y = page.original_size[1] / page.size[1]

    def place(box: Any) -> Any:
        if rotated:
            from watcherd.ocr.child.orientation import box_to_original

            box = box_to_original(box, rotated, seen)
        return box_from_points([(x * scale_x, y * scale_y) for x, y in box])

    words = tuple(Word(w.text, place(w.box), w.score) for w in line.words if _finite(w.box))
    return Line(line.text, place(line.box), line.score, words)


def _from_report(page: dict[str, Any], document: Document) -> tuple[Any, ...]:
    """A page read in an earlier turn, as the parent kept it, in render.RenderedPage's fields."""
    width, height = page.get("resized_from") or page["size"]
    lines = tuple(
        Line(
            line["text"],
            box_from_points(line["box"]),
            line.get("score"),
            tuple(Word(w["text"], box_from_points(w["box"]), w.get("score")) for w in line.get("words") or ()),
        )
        for line in page.get("lines") or ()
    )
    number = page["page"]
    return (number, width, height, document.page_dpi(number - 1), lines, page["text"], page.get("source", "ocr"))


def _finite(box: Any) -> bool:
    """A box the engine gave with a NaN or an infinity in it is dropped: it places nothing."""
    return all(math.isfinite(v) for point in box for v in point)


def _line_json(line: Line) -> dict[str, Any]:
    entry = _positioned(line.text, line.box, line.score)
    if line.words:
        entry["words"] = [_positioned(w.text, w.box, w.score) for w in line.words]
    return entry


def _positioned(text: str, box: Any, score: float | None) -> dict[str, Any]:
    score = None if score is None or not math.isfinite(score) else round(min(1.0, max(0.0, float(score))), 4)
    return {"text": protocol.valid_text(text)[0], "score": score, "box": [[round(x, 1), round(y, 1)] for x, y in box]}


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
