"""Operator commands that work beside a running daemon: `watcherd status` and `watcherd retry`."""

from __future__ import annotations

import fnmatch
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from . import outputs
from .logs import escape
from .settings import Settings


def find_status(settings: Settings | None) -> Path | None:
    """The daemon's status file, in its inbox's work area (one daemon per inbox)."""
    if settings is None or settings.paths.inbox is None:
        return None
    path = settings.processing_dir / "status.json"
    return path if path.exists() else None


def running(status: dict[str, Any]) -> bool:
    if status.get("state") == "stopped":
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(status: dict[str, Any]) -> str:
    alive = running(status)
    lines = [
        f"watcherd {status['version']}: {'running' if alive else 'NOT running'} (pid {status['pid']}), "
        f"{status['state']}; updated {status['updated_at']}"
    ]
    lines.append(f"  {status['summary']}")
    lines.append(
        f"  inbox {status['inbox']}: {status['watch_mode']} ({status.get('watch_reason', '')}), "
        f"engine {status['engine']}"
    )
    q = status["queue"]
    lines.append(
        f"  queue: {q['ready']} ready, {q['claimed']} claimed, {q['waiting_for_memory']} waiting for GPU "
        f"memory, {q['settling']} still being written"
    )
    for item in status["in_flight"]:
        lines.append(
            f"  in flight: {escape(item['source'])} page {item['page'] or 1}/{item['pages'] or '?'}, "
            f"{item['elapsed_s']:.0f} s (child {item['child_pid']})"
        )
    for child in status["children"]:
        device = "default device" if child["device"] is None else f"GPU {child['device']}"
        lines.append(f"  child pid {child['pid']} on {device}: {child['state']}, {child['files_done']} files")
    if status["last_error"]:
        e = status["last_error"]
        # Names and details come from the inbox and the engine: escaped before a terminal sees them.
        lines.append(f"  last error: {escape(e['source'])}: {e['error_code']}: {escape(str(e['detail']))} ({e['at']})")
    gpu = status.get("gpu") or {}
    if gpu.get("available"):
        lines.append(f"  GPU: {gpu['free_mb']} MB free of {gpu['total_mb']} MB ({gpu['usage_percent']}% used)")
    return "\n".join(lines)


def retry(settings: Settings, pattern: str = "*") -> list[tuple[Path, Path]]:
    """Move failed originals matching `pattern` (relative to the failed folder) back into the inbox.

    Their error JSON is moved aside to `<failed>/.retried/`, so the record of the failure stays
    and the next result or error JSON for the file does not get a suffix because of it.
    """
    failed, inbox = settings.paths.failed, settings.paths.inbox
    assert failed is not None and inbox is not None
    moved = []
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    for json_path in sorted(failed.rglob("*.json")):
        rel_json = json_path.relative_to(failed)
        if rel_json.parts[0] == ".retried" or json_path.name.startswith("."):
            continue
        original = json_path.with_name(json_path.name[: -len(".json")])
        rel = original.relative_to(failed).as_posix()
        if not os.path.lexists(original) or not fnmatch.fnmatch(rel, pattern):
            continue
        back = outputs.choose_names(rel, targets={"original": (inbox, "")})["original"]
        aside = failed / ".retried" / rel_json.parent / f"{json_path.name[: -len('.json')]}.{stamp}.json"
        outputs.move(original, back)  # first: a crash here leaves a duplicate record, never a lost file
        outputs.move(json_path, aside)
        moved.append((original, back))
    return moved


def load_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
