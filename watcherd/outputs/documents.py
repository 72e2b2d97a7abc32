"""The result and error documents of design §5, in one place: their fields, the error codes and
messages (zh-TW wording follows the service watcherd replaced, so operators' alerts keep
matching), names as they appear in JSON, and the failures the parent sees from lstat alone.
Used by the daemon and by `watcherd ocr` alike.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from watcherd import __version__
from watcherd.core.naming import display_name, now_iso
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import Settings

# zh-TW wording follows the service watcherd replaces, so operators' alerts keep matching.
MESSAGES: dict[str, dict[str, str]] = {
    "zh-TW": {
        "timeout": "OCR 處理超時 ({timeout:g} 秒)，請嘗試使用更小的圖片或增加超時設定",
        "vram_insufficient": "GPU 記憶體不足，可用記憶體: {free_mb} MB，建議至少有 {min_free_mb} MB 可用記憶體",
        "engine_error": "OCR 處理發生錯誤: {detail}",
        "child_crashed": "OCR 處理發生錯誤: OCR 子程序異常終止 ({detail})",
        "unreadable": "無法讀取檔案: {detail}",
        "unsupported_type": "不支援的檔案類型: {detail}",
        "too_large": "檔案過大: {detail}",
        "not_regular_file": "不是一般檔案，已略過: {detail}",
    },
    "en": {
        "timeout": "OCR timed out ({timeout:g} s); try a smaller image or raise ocr.timeout_s",
        "vram_insufficient": "Not enough GPU memory: {free_mb} MB free, at least {min_free_mb} MB recommended",
        "engine_error": "OCR failed: {detail}",
        "child_crashed": "OCR failed: the OCR child process died ({detail})",
        "unreadable": "Cannot read the file: {detail}",
        "unsupported_type": "Unsupported file type: {detail}",
        "too_large": "File too large: {detail}",
        "not_regular_file": "Not a regular file, skipped: {detail}",
    },
}


def error_message(code: str, locale: str, **values: Any) -> str:
    values.setdefault("detail", "")
    return MESSAGES[locale][code].format(**values)


def document_for(outcome: Outcome, *, settings: Settings, received_at: str) -> tuple[dict[str, Any], str | None]:
    """The result or error JSON for an outcome (design §5), and the text for the .md/.txt file."""
    common = {
        **display_name(outcome.job.rel),
        "image_path": None,  # set to the original's final place when it is published
        "sha256": outcome.sha256,
    }
    if outcome.duplicate_of is not None:  # the same bytes were OCR'd before (dedupe: skip)
        document: dict[str, Any] = {
            "status": "duplicate",
            **common,
            "duplicate_of": outcome.duplicate_of,
            "attempts": outcome.job.attempts,
            "received_at": received_at,
            "finished_at": now_iso(),
            "watcherd_version": __version__,
        }
        return document, None
    if outcome.ok:
        text = "\n\n".join(page["text"] for page in outcome.pages)
        document = {
            "status": "ok",
            **common,
            "text": text,
            "pages": outcome.pages,
            "processing_time": outcome.processing_time,
            "engine": outcome.engine,
            "model": outcome.model,
            "gpu_info_before": outcome.gpu_info_before,
            "gpu_info_after": outcome.gpu_info_after,
            "attempts": outcome.job.attempts,
            "received_at": received_at,
            "finished_at": now_iso(),
            "watcherd_version": __version__,
        }
        if outcome.render_errors:  # e.g. {"pdf": "..."}: the text is good, that output could not be made
            document["output_errors"] = outcome.render_errors
        return document, text
    code = outcome.code or "engine_error"
    message = error_message(
        code,
        settings.output.locale,
        detail=outcome.detail or "",
        timeout=settings.ocr.timeout_s,
        free_mb=outcome.gpu_info_after.get("free_mb", "?"),
        min_free_mb=settings.gpu.min_free_mb,
    )
    document = {
        "status": "failed",
        "error_code": code,
        "error": message,
        **common,
        "processing_time": outcome.processing_time,
        "gpu_info": outcome.gpu_info_after,
        "attempts": outcome.job.attempts,
        "detail": outcome.detail,
        "engine": outcome.engine,
        "model": outcome.model,
        "received_at": received_at,
        "finished_at": now_iso(),
        "watcherd_version": __version__,
    }
    return document, None


def precheck(job: Job, st: os.stat_result, settings: Settings) -> Outcome | None:
    """Failures the parent can see from lstat alone, without giving the file to the child."""
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "folder"
            if stat.S_ISDIR(st.st_mode)
            else ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device")
        )
        return Outcome(job=job, ok=False, code="not_regular_file", detail=f"{kind}, not followed")
    if st.st_size > settings.ocr.max_file_bytes:
        detail = f"{st.st_size / 1024 / 1024:.1f} MB, more than ocr.max_file_mb ({settings.ocr.max_file_mb:g})"
        return Outcome(job=job, ok=False, code="too_large", detail=detail)
    return None
