"""What watcherd writes, as content and names: error messages, document fields, clash-free names.

The writing itself (atomic, never overwriting, never through a link) is `safefs`; the order of the
writes, which makes them crash-safe, is `spool`.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NAME_MAX = 255  # bytes, for ext4, xfs, btrfs, SMB and NFS alike

ERROR_CODES = (
    "timeout",
    "vram_insufficient",
    "engine_error",
    "child_crashed",
    "unreadable",
    "unsupported_type",
    "too_large",
    "not_regular_file",
)

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


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


def display_name(rel: str) -> dict[str, str]:
    """`source` for the JSON, faithful even for names that are not UTF-8.

    Paths are str with surrogate escapes (PEP 383). A name from an old Windows share in Big5 or
    Latin-1 cannot go into JSON as is: `source` shows it with \\x escapes and `source_b64` keeps
    the exact bytes.
    """
    raw = os.fsencode(rel)
    try:
        return {"source": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"source": raw.decode("utf-8", "backslashreplace"), "source_b64": base64.b64encode(raw).decode()}


def public_path(path: Path | str | None) -> str | None:
    if path is None:
        return None
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def dumps(document: dict[str, Any]) -> bytes:
    # "replace": a lone surrogate that slipped through must cost one character, never the file.
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8", "replace")


# -- names -----------------------------------------------------------------------------------


def fit_name(name: str, extra: int = 0) -> str:
    """Shorten `name` so that it plus `extra` bytes (a suffix such as `_12.json`) fits NAME_MAX."""
    raw = os.fsencode(name)
    if len(raw) + extra <= NAME_MAX:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or len(os.fsencode(ext)) > 16:
        stem, ext = name, ""
    keep = NAME_MAX - extra - len(os.fsencode(ext)) - (1 if ext else 0) - 1
    raw_stem = os.fsencode(stem)
    while 0 < keep < len(raw_stem) and raw_stem[keep] & 0xC0 == 0x80:
        keep -= 1  # never split a UTF-8 character; other bytes (Latin-1 names) are kept as they are
    short = os.fsdecode(raw_stem[:keep])
    return f"{short}~.{ext}" if ext else f"{short}~"


def with_suffix_number(name: str, n: int) -> str:
    """`b.jpg`, 1 → `b_1.jpg`; the extension stays last so tools still know the type."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}_{n}"
    return f"{stem}_{n}.{ext}"


def choose_names(rel: str, *, targets: dict[str, tuple[Path, str]]) -> dict[str, Path]:
    """Pick one clash-free name for a file's outputs.

    `targets` maps a role (json, text, original) to (folder root, appended extension). The same
    suffix number is used for every role so that `outbox/a_1.jpg.json` belongs with
    `archive/a_1.jpg`. Names that would exceed NAME_MAX with their suffix are shortened.
    """
    parent, _, name = rel.rpartition("/")
    longest_ext = max(len(ext) for _, ext in targets.values())
    name = fit_name(name, extra=longest_ext + 8)
    n = 0
    while True:
        candidate = with_suffix_number(name, n)
        paths = {
            role: (root / parent / f"{candidate}{ext}" if parent else root / f"{candidate}{ext}")
            for role, (root, ext) in targets.items()
        }
        if not any(os.path.lexists(p) for p in paths.values()):
            return paths
        n += 1
