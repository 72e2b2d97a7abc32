"""Feeding the engine: which pages go into each engine call, and when.

An engine with `ocr_batch` reads `ocr.batch_pages` pages a call, across the files of a request
(a batch may end one file and start the next, so a GPU is fed while one-page scans queue); any
other engine, or a `solo` request, one page a call. A long file is read a turn (`turn_pages`) at
a time. Before every call the VRAM guard looks at the GPU (design §7); every
`gpu.clear_cache_every` files the cache is given back. What is said about the pages and written
for them is report.py's.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from watcherd.core.records import InputError
from watcherd.core.text import as_page
from watcherd.ocr import gpu, protocol
from watcherd.ocr.child.decode import Document, Page
from watcherd.ocr.child.report import EngineError, File, Reporter, earlier_page
from watcherd.ocr.engines import EngineUnavailable

Slot = tuple[File, int]  # a page of a file (0-based), waiting for the engine
Decoded = tuple[Page, int | None, Any]  # the page, the degrees it was turned upright (or None), the image
Prepared = tuple[File, Page, int | None, Any]  # a Slot decoded


class Batcher:
    """Reads the files of `ocr` requests with the engine. `send(op, **fields)` writes a message
    to the parent; `top_ups()` yields the file entries of further `ocr` requests the parent has
    sent meanwhile (read between batches, never waiting for one); `batch_pages` is 1 for an
    engine without `ocr_batch`."""

    def __init__(
        self,
        engine: Any,
        orientation: Any,
        spec: dict[str, Any],
        *,
        batch_pages: int,
        send: Callable[..., None],
        top_ups: Callable[[], Iterable[protocol.FileRequest]],
    ):
        self.engine = engine
        self.orientation = orientation  # the page-orientation classifier, with ocr.auto_rotate
        self.spec = spec
        self.batch_pages = batch_pages
        self.send = send
        self.top_ups = top_ups
        self.report = Reporter(send, memory_max_mb=spec.get("memory_max_mb"))
        self.files_done = 0

    def ocr(self, request: protocol.OcrRequest) -> None:
        """One `ocr` request: one file, or several when the engine reads pages in batches (the
        parent keeps about three batches' worth here, and more files join while it runs). Pages
        of the files share engine calls, `ocr.batch_pages` at a time, in the files' order: a batch
        may end one file and start the next, so a GPU is fed while one-page scans queue. Each file
        is read from `first_page`, at most `turn_pages` pages when it has more, and finished
        (rendered, `done`) as soon as its last page is read; a file that fails costs only itself."""
        per_call = 1 if request.solo else self.batch_pages
        turn = request.turn_pages
        files = [f for f in (self._open(spec, per_call, turn) for spec in request.files) if f is not None]
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

    # -- the GPU -------------------------------------------------------------------------------

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

    def _defer(self, files: list[File], **fields: Any) -> None:
        """Every file of the request waits: too little GPU memory, or the engine's server is unavailable."""
        for f in files:
            if not f.failed:
                self.send("deferred", id=f.id, sha256=f.sha256, **fields)

    # -- the files -----------------------------------------------------------------------------

    def _more(self, files: list[File], per_call: int, turn: int) -> None:
        """Files the parent sent while these were being read (it keeps a batch engine fed: the
        next files arrive before the last batch ends), opened and added behind the others."""
        files += [f for f in (self._open(spec, per_call, turn) for spec in self.top_ups()) if f is not None]

    def _open(self, spec: protocol.FileRequest, per_call: int, turn: int) -> File | None:
        """Read a file of the request, hash it and count its pages (`pages`), or say why not (`failed`)."""
        sha256 = None
        try:
            with open(spec.path, "rb", opener=_open_nofollow) as f:
                # read(n) allocates n bytes first: ask for what the file holds (plus one, to see
                # it grow past the limit), not for max_file_bytes, which RLIMIT_DATA may not allow.
                st = os.fstat(f.fileno())
                data = f.read(min(st.st_size, self.spec["max_file_bytes"]) + 1)
            if len(data) > self.spec["max_file_bytes"]:
                raise InputError("too_large", f"larger than ocr.max_file_mb ({self.spec['max_file_mb']:g} MB)")
            sha256 = hashlib.sha256(data).hexdigest()
            document = Document(data, max_side_px=self.spec["max_side_px"], max_pages=self.spec["max_pages"])
            render = spec.render
            original = data if "pdf" in (render.get("formats") or {}) else None  # the PDF is built around it
            del data
            # The inode read: the parent checks it is the one it claimed (design §9).
            file = [st.st_dev, st.st_ino]
            self.send("pages", id=spec.id, count=len(document), sha256=sha256, kind=document.kind, file=file)
            first = spec.first_page
            stop = min(len(document), first + max(turn, per_call)) if turn else len(document)
            opened = File(spec.id, spec.path, render, document, sha256, original, first, first, stop, self.gpu_info())
            if first:  # a later turn: what the earlier ones read, for the PDF/hOCR/ALTO
                opened.rendered = [earlier_page(page, document) for page in spec.earlier]
            return opened
        except Exception as exc:  # noqa: BLE001 - a hostile file costs itself only (Reporter says how)
            self.report.failed(spec.id, exc, sha256)
            return None

    def _finished(self, f: File, ahead: _Prefetch | None) -> bool:
        """Is the file's part of the request over? Then its turn ends (`done` with `next_page`),
        or its PDF/hOCR/ALTO are written and it is `done`. The cache is cleared every
        `clear_cache_every` files, between batches."""
        if f.failed:
            return True
        if f.next < f.stop or (ahead is not None and any(g is f for g, _ in ahead.batch)):
            return False
        if f.stop < len(f.document):  # other files' turn: come back for the rest
            self.report.turn_over(f)
            return True
        try:
            written, errors = self.report.render(f)
        except Exception as exc:  # noqa: BLE001 - costs this file only
            self.report.fail(f, exc)
            return True
        self.files_done += 1
        if self.files_done % self.spec["clear_cache_every"] == 0:
            self.clear_cache()
        self.report.done(f, self.gpu_info(), written, errors)
        return True

    # -- the batches ---------------------------------------------------------------------------

    def _next_batch(self, files: list[File], per_call: int, unread: list[Slot]) -> list[Slot]:
        """The next pages for the engine, up to `per_call`, in the files' order. Pages with a text
        layer of their own are reported on the way, without the engine (and never out of their
        file's order: such a page waits while pages before it are in this batch or `unread`)."""
        batch: list[Slot] = []
        alone = per_call > 1 and sum(not f.failed for f in files) == 1
        for f in files:
            while not f.failed and len(batch) < per_call:
                if f.next >= f.stop and not (alone and f.go_on()):
                    break
                try:
                    layer = self._text_layer(f, f.next)
                    if layer is None:
                        batch.append((f, f.next))
                    elif any(g is f for g, _ in batch + unread):
                        break
                    else:  # born-digital (or OCR'd before): no engine, no GPU
                        self.report.layer_page(f, f.next, layer)
                except Exception as exc:  # noqa: BLE001 - a hostile PDF's text layer
                    self.report.fail(f, exc)
                    break
                f.next += 1
            if len(batch) == per_call:
                break
        return batch

    def _text_layer(self, f: File, index: int) -> Any:
        """The text layer of PDF page `index` when it has one and ocr.pdf_text says use it."""
        if f.document.kind != "pdf" or self.spec.get("pdf_text") != "use":
            return None
        if index not in f.layers:
            f.layers[index] = f.document.text_layer(index)
        return f.layers[index]

    def _start(self, batch: list[Slot]) -> float:
        """Tell the parent a batch starts (its deadline covers the whole call): each file in it
        gets a `page_start` with its first page here and the batch's size."""
        count = len(batch)
        first_pages: dict[File, int] = {}  # file → its first page in the batch, in the batch's order
        for f, index in batch:
            first_pages.setdefault(f, index)
        for f, index in first_pages.items():
            self.send("page_start", id=f.id, page=index + 1, **({"pages": count} if count > 1 else {}))
        return time.monotonic()

    def decode(self, f: File, index: int) -> Decoded | Exception:
        """A page as the engine sees it (turned upright with ocr.auto_rotate), or what stopped it.
        Sends nothing: it also runs on the prefetch thread."""
        try:
            page = f.document.page(index)
            rotated = self.orientation.detect(page.image) if self.orientation is not None else None
            return page, rotated, upright(page.image, rotated) if rotated else page.image
        except Exception as exc:  # noqa: BLE001 - the page's decoder, on a hostile file
            return exc

    def _prepared(self, batch: list[Slot], decoded: list[Decoded | Exception] | None) -> list[Prepared]:
        """The batch's pages decoded (here, or already by the prefetch thread); a page that
        cannot be decoded fails its file, and that file's other pages leave the batch."""
        prepared = []
        for n, (f, index) in enumerate(batch):
            if f.failed:
                continue
            got = decoded[n] if decoded is not None else self.decode(f, index)
            if isinstance(got, Exception):
                self.report.fail(f, got)
            else:
                prepared.append((f, *got))
        return [p for p in prepared if not p[0].failed]

    def _read(self, prepared: list[Prepared], started: float) -> None:
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
        except EngineError as exc:
            if len({id(f) for f, _, _, _ in prepared}) == 1:
                self.report.fail(prepared[0][0], exc)
                return
            results = []
            for f, page, _, image in prepared:  # which file's page was it? Each alone
                self.send("page_start", id=f.id, page=page.number)
                try:
                    results += self._call([image]) if not f.failed else [None]
                except EngineError as alone:
                    self.report.fail(f, alone)
                    results.append(None)
        wall = time.monotonic() - started
        # A page's share of its batch, and the batch's wall time: honest per-page figures.
        timing: dict[str, Any] = {"processing_time": round(wall / len(prepared), 3)}
        if len(prepared) > 1:
            timing.update(batch_pages=len(prepared), batch_time=round(wall, 3))
        for (f, page, rotated, image), result in zip(prepared, results, strict=True):
            if not f.failed and result is not None:
                self.report.ocr_page(f, page, rotated, image.size, result, timing)

    def _call(self, images: list[Any]) -> list[Any]:
        """The engine on these pages: its answers as PageText, or EngineError saying what failed.
        EngineUnavailable (its server is down or busy) passes through: the files wait."""
        try:
            if len(images) > 1:
                answers = list(self.engine.ocr_batch(images))
                if len(answers) != len(images):
                    raise EngineError(f"ocr_batch returned {len(answers)} pages for {len(images)}")
            else:
                answers = [self.engine.ocr(images[0])]
            return [as_page(answer) for answer in answers]
        except (EngineError, EngineUnavailable):
            raise
        except TypeError as exc:  # as_page: neither str nor PageText
            raise EngineError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - MemoryError included: the model's failure
            traceback.print_exc()
            note = self.report.memory_note() if isinstance(exc, MemoryError) else ""
            raise EngineError(f"{type(exc).__name__}: {exc}{note}") from None


class _Prefetch:
    """The next batch's pages decoded on a thread of their own while the engine reads the current
    batch, so that the engine is not kept waiting by the decoder (a PDF page rendered at 200 dpi,
    a PNG inflated, the orientation model). Only after a batch of several pages: should the
    decoder hang, the parent's timeout then re-reads every file alone, without prefetching."""

    def __init__(self, batcher: Batcher, batch: list[Slot]):
        self.batch = batch
        self.decoded: list[Decoded | Exception] = []
        self._thread = threading.Thread(target=self._run, args=(batcher,), name="watcherd-prefetch", daemon=True)
        self._thread.start()

    def _run(self, batcher: Batcher) -> None:
        self.decoded = [batcher.decode(f, index) for f, index in self.batch]

    def wait(self) -> None:
        self._thread.join()


def upright(image: Any, rotated: int) -> Any:
    from watcherd.ocr.child.orientation import upright as turn

    return turn(image, rotated)


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
