"""Everything watcherd writes: result/error documents, atomic files, clash-free names, moves.

Contracts (DESIGN §1):
- Outputs appear atomically: data goes to a hidden temp file in the destination folder, is
  fsync'ed, then linked into place; the folder is fsync'ed too, so a crash leaves either the whole
  file or none.
- Nothing is overwritten: `link(2)` fails when the name exists, so the no-clobber check and the
  publish are one step even if another program writes into the outbox at the same moment.
- Moves of originals are rename(2) where possible, else copy + fsync + rename + unlink, and are
  idempotent so a crash halfway can simply be done again.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NAME_MAX = 255  # bytes, for ext4, xfs, btrfs, SMB and NFS alike
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # mkstemp makes 0600 files; outputs get the mode the umask (UMask=) asks for

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
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


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


# -- atomic files ----------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    """`.name.` cut to 200 *bytes* (NAME_MAX counts bytes: 200 CJK characters are 600), leaving
    room for mkstemp's random part and `.tmp`."""
    return f".{os.fsdecode(os.fsencode(name)[:200])}."


def write_atomic(path: Path, data: bytes) -> None:
    """Publish `data` at `path`, whole or not at all; never replaces a different existing file.

    If `path` already holds exactly `data` (a publish redone after a crash) this is a no-op.
    Raises FileExistsError if `path` holds something else.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            if path.read_bytes() != data:
                raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # Filesystems without hard links (some SMB/FUSE mounts): check, then rename.
            if os.path.lexists(path):
                if path.read_bytes() != data:
                    raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
            else:
                os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def move(src: Path, dst: Path) -> None:
    """Move `src` to `dst` without replacing anything at `dst`; safe to repeat after a crash.

    Same filesystem: one rename(2) (after a no-clobber check; our own names are reserved by
    `choose_names`, so the check only guards against other writers). Across filesystems: copy to a
    temp file beside `dst`, fsync, rename into place, then unlink `src`.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dst):
        if not os.path.lexists(src):
            return  # done before a crash; this is the repeat
        if _same_content(src, dst):
            remove(src)  # a cross-filesystem move that crashed after the copy: finish it
            return
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if src.is_dir() and not src.is_symlink():
            # Copied beside the destination and renamed into place, so `dst` exists only once the
            # copy is whole: a kill halfway leaves `src` intact and the redo starts over.
            tmp_dir = dst.parent / f".{os.fsencode(dst.name)[:200].decode('utf-8', 'ignore')}.watcherd-copy"
            if os.path.lexists(tmp_dir):
                shutil.rmtree(tmp_dir)
            shutil.copytree(src, tmp_dir, symlinks=True)
            os.rename(tmp_dir, dst)
            fsync_dir(dst.parent)
            shutil.rmtree(src)
            return
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dst.name), suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            if src.is_symlink():
                os.unlink(tmp)
                os.symlink(os.readlink(src), tmp)
            else:
                shutil.copy2(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.rename(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        fsync_dir(dst.parent)
        os.unlink(src)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def _same_content(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    if a.is_dir() or b.is_dir():
        return a.is_dir() and b.is_dir()
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def remove(path: Path) -> None:
    """Delete a claimed original (or a folder named like one); missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
