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

Every reply carries the request's id. The child never publishes outputs or moves files: the
searchable PDF, hOCR and ALTO it writes go to scratch files in the state folder (never the inbox)
named by the parent, fsync'ed before `done`, and the parent publishes them. If the child is killed
at any instant, the parent still holds everything it needs to finish the file (it reads it again).

Messages, child → parent:
  ready {engine, model, device, load_time, pid}      | load_failed {detail, config_error}
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
parent → child: ocr {id, path, render, solo, first_page, turn_pages, earlier}
                | idle {} (queue drained: clear the cache) | exit {}
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import gpu, protocol
from .engines import (
    EngineConfigError,
    EngineNotFound,
    EngineUnavailable,
    Line,
    Word,
    as_page,
    box_from_points,
    resolve,
)
from .pages import PDF_DPI, Document, InputError, Page

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
                from .orientation import OrientationDetector

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
                self.ocr_file(message)
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

    def ocr_file(self, request: dict[str, Any]) -> None:
        """One `ocr` request: read the file, OCR its pages (from `first_page`, at most `turn_pages`
        of them when it has more), write what `render` asks for at its last page, and report."""
        request_id, path = request["id"], request["path"]
        render = request.get("render") or {}
        per_call = 1 if request.get("solo") else self.batch_pages
        first, turn = int(request.get("first_page") or 0), int(request.get("turn_pages") or 0)
        targets: dict[str, str] = render.get("formats") or {}
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
            original = data if "pdf" in targets else None  # the searchable PDF is built around it
            del data
            # The inode read: the parent checks it is the one it claimed (DESIGN §9).
            self.send("pages", id=request_id, count=len(document), sha256=sha256, kind=document.kind, file=file)
            before = self.gpu_info()
            rendered: list[Any] = []
            layers: dict[int, Any] = {}
            index, count = first, len(document)
            if first:  # a later turn: what the earlier ones read, for the PDF/hOCR/ALTO
                rendered = [_from_report(page, document) for page in request.get("earlier") or []]
            while index < count:
                if turn and index - first >= max(turn, per_call):  # other files' turn: come back for the rest
                    self.send("done", id=request_id, next_page=index, gpu_info_before=before, gpu_info_after={})
                    return
                layer = self._text_layer(document, index, layers)
                if layer is not None:  # born-digital (or OCR'd before): no engine, no GPU
                    rendered.append(self._layer_page(request_id, document, index, layer))
                    index += 1
                    continue
                shortage = self.memory_shortage()  # the VRAM guard, before every batch
                if shortage is not None:
                    self.send("deferred", id=request_id, gpu_info=shortage, sha256=sha256)
                    return
                batch = [index]
                index += 1
                while index < count and len(batch) < per_call:
                    if self._text_layer(document, index, layers) is not None:
                        break
                    batch.append(index)
                    index += 1
                try:
                    rendered += self._ocr_pages(request_id, document, batch)
                except EngineUnavailable as exc:
                    reason = "engine_unavailable"
                    self.send("deferred", id=request_id, gpu_info=before, sha256=sha256, reason=reason, detail=str(exc))
                    return
            written, errors = self._render(request_id, targets, render, rendered, original, document.kind, path)
            self.files_done += 1
            if self.files_done % self.spec["clear_cache_every"] == 0:
                self.clear_cache()
            self.send(
                "done",
                id=request_id,
                gpu_info_before=before,
                gpu_info_after=self.gpu_info(),
                rendered=written,
                render_errors=errors,
            )
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

    def _ocr_pages(self, request_id: int, document: Document, indices: list[int]) -> list[tuple[Any, ...]]:
        """OCR pages `indices` of a file in one engine call: `ocr_batch` for several (an engine
        that has it and ocr.batch_pages > 1), `ocr` for one. Each page is turned upright first
        (ocr.auto_rotate) and its boxes mapped back to the original page's pixels. The parent's
        deadline covers the whole batch (one page_start)."""
        count = len(indices)
        self.send("page_start", id=request_id, page=indices[0] + 1, **({"pages": count} if count > 1 else {}))
        started = time.monotonic()
        pages = [document.page(i) for i in indices]
        rotations = [self.orientation.detect(p.image) if self.orientation is not None else None for p in pages]
        images = [upright(p.image, r) if r else p.image for p, r in zip(pages, rotations, strict=True)]
        try:
            if count > 1:
                answers = list(self.engine.ocr_batch(images))
                if len(answers) != count:
                    raise _EngineError(f"ocr_batch returned {len(answers)} pages for {count}")
            else:
                answers = [self.engine.ocr(images[0])]
            results = [as_page(answer) for answer in answers]
        except (_EngineError, EngineUnavailable):
            raise  # EngineUnavailable: its server is down or busy, the whole file waits (ocr_file)
        except TypeError as exc:  # as_page: neither str nor PageText
            raise _EngineError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - MemoryError included: the model's failure
            traceback.print_exc()
            note = self._memory_note() if isinstance(exc, MemoryError) else ""
            raise _EngineError(f"{type(exc).__name__}: {exc}{note}") from None
        wall = time.monotonic() - started
        # A page's share of its batch, and the batch's wall time: honest per-page figures.
        timing: dict[str, Any] = {"processing_time": round(wall / count, 3)}
        if count > 1:
            timing.update(batch_pages=count, batch_time=round(wall, 3))
        reports = []
        for page, rotated, image, result in zip(pages, rotations, images, results, strict=True):
            try:
                text = result.full_text
                lines = tuple(
                    _to_original(line, rotated or 0, image.size, page) for line in result.lines if _finite(line.box)
                )
            except (TypeError, ValueError, IndexError) as exc:
                raise _EngineError(f"engine returned positions that are not boxes: {exc}") from None
            reports.append(
                self._report(
                    request_id,
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
        return reports

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

    def _render(
        self,
        request_id: int,
        targets: dict[str, str],
        render: dict[str, Any],
        pages: list[Any],
        original: bytes | None,
        kind: str | None,
        path: str,
    ) -> tuple[list[str], dict[str, str]]:
        """Write the searchable PDF, hOCR and ALTO asked for to their scratch files in the state
        folder (trusted: never inside the inbox), durably, for the parent to publish. A format
        that cannot be written is reported, not fatal: the text and the JSON are worth having."""
        if not targets:
            return [], {}
        from .render import RenderedPage, alto, hocr, write_pdf

        pages = [RenderedPage(*fields) for fields in pages]
        self.send("rendering", id=request_id)
        name = os.path.basename(path)
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


def upright(image: Any, rotated: int) -> Any:
    from .orientation import upright as turn

    return turn(image, rotated)


def _to_original(line: Line, rotated: int, seen: tuple[int, int], page: Page) -> Line:
    """A line found on the image the engine saw (turned upright, maybe shrunk) in the pixels of
    the original page, with its words."""
    scale_x = page.original_size[0] / page.size[0]
    scale_y = page.original_size[1] / page.size[1]

    def place(box: Any) -> Any:
        if rotated:
            from .orientation import box_to_original

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
