"""Files finished since start: counted once, when their JSON is published, for the status line,
the status file and the metrics."""

from __future__ import annotations

from typing import Any

from watcherd.core.records import Outcome
from watcherd.ops.metrics import Metrics


class Tally:
    """`counts` (ok, failed, duplicate), `pages` (OCR'd, or taken from the PDF's own text layer)
    and the last error, as the status file shows them; every published document also goes to the
    metrics (by status and error code, pages, last success)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.counts = {"ok": 0, "failed": 0, "duplicate": 0}
        self.pages = {"ocr": 0, "pdf_text": 0}  # pages OCR'd, and those whose own text layer was taken
        self.last_error: dict[str, Any] | None = None

    def add(self, outcome: Outcome, document: dict[str, Any]) -> None:
        """A file's result or error JSON was published."""
        self.metrics.finished(document)
        if document["status"] == "duplicate":
            self.counts["duplicate"] += 1
        elif outcome.ok:
            self.counts["ok"] += 1
            for page in outcome.pages:  # pages whose own text layer saved an OCR (ocr.pdf_text: use)
                self.pages["pdf_text" if page.get("source") == "pdf_text" else "ocr"] += 1
        else:
            self.counts["failed"] += 1
            self.last_error = {
                "source": document["source"],
                "error_code": outcome.code,
                "detail": outcome.detail,
                "at": document["finished_at"],
            }
