"""The status file (written by the daemon, read by `watcherd status`) and `watcherd retry`.

Both read things other people can influence: the status file holds file names chosen by share
users, and failed/ holds their originals and whatever folder shapes they dropped. So the status is
read without following links or blocking on a FIFO, within a size cap, tolerating any shape, and
printed with control characters escaped; retry walks failed/ by descriptor, trusts only error
JSON that watcherd wrote for that very original, and moves nothing through a link.
"""

from __future__ import annotations

import json
import logging
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

from watcherd.core import safefs
from watcherd.core.logs import escape
from watcherd.core.records import inbox_id
from watcherd.core.settings import Settings

log = logging.getLogger("watcherd")

STATUS_MAX_BYTES = 4 << 20
STALE_AFTER_S = 60.0  # the loop rewrites the status at least every few seconds while it runs


def proc_start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid it
    names one process, so a pid reused by another program is not taken for the daemon."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def status_file(settings: Settings) -> Path:
    assert settings.paths.inbox is not None
    return settings.state_dir / f"{inbox_id(settings.paths.inbox)}.status.json"


def write_status(settings: Settings, status: dict[str, Any]) -> None:
    """Replace the status file atomically, never through a link (not fsync'ed: it is not data).
    Never raises: the status must never take the daemon down."""
    path = status_file(settings)
    try:
        with safefs.folder(path.parent, []) as fd:
            safefs.write_private(fd, path.name, json.dumps(status, ensure_ascii=True, indent=2).encode(), mode=0o640)
    except (OSError, ValueError) as exc:
        log.debug("Cannot write %s: %s", path, exc)


def load_status(path: Path) -> dict[str, Any] | str:
    """The status document, or why it cannot be read (a string)."""
    try:
        with safefs.folder(path.parent, []) as fd:
            st = safefs.lstat_at(fd, path.name)
            if st is None:
                return "no status file: the daemon has not run with this configuration (try --config)"
            if not stat.S_ISREG(st.st_mode):
                return f"{path} is not a regular file"
            data = safefs.read_regular(fd, path.name, STATUS_MAX_BYTES + 1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if data is None or len(data) > STATUS_MAX_BYTES:
        return f"{path} is not a readable status file"
    try:
        status = json.loads(data)
    except ValueError:
        return f"{path} is not valid JSON"
    if not isinstance(status, dict):
        return f"{path} is not a status document"
    return status


def liveness(status: dict[str, Any], *, now: float | None = None) -> tuple[str, int]:
    """("running" | "NOT running" | "NOT responding", exit code 0 | 3 | 1) for a status document."""
    pid, started = status.get("pid"), status.get("pid_started")
    if status.get("state") == "stopped" or not isinstance(pid, int) or pid <= 0:
        return "NOT running", 3
    current = proc_start_time(pid)
    if current is None or (isinstance(started, int) and current != started):
        return "NOT running", 3  # gone, or the pid now belongs to another process
    try:
        updated = datetime.fromisoformat(str(status.get("updated_at"))).timestamp()
    except ValueError:
        return "NOT responding", 1
    age = (now if now is not None else datetime.now().timestamp()) - updated
    if age > STALE_AFTER_S:
        return f"NOT responding (status not updated for {age:.0f} s)", 1
    return "running", 0


def format_status(status: dict[str, Any]) -> str:
    """Readable lines for any status document, however incomplete; every value escaped."""

    def get(*keys: str, default: Any = "?") -> Any:
        value: Any = status
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return default if value is None else value

    alive, _ = liveness(status)
    e = escape
    lines = [
        f"watcherd {e(get('version'))}: {alive} (pid {e(get('pid'))}), {e(get('state'))}; "
        f"updated {e(get('updated_at'))}",
        f"  {e(get('summary', default=''))}",
        f"  inbox {e(get('inbox'))}: {e(get('watch_mode'))} ({e(get('watch_reason', default=''))}), "
        f"engine {e(get('engine'))}",
        f"  finished: {e(get('counts', 'ok', default=0))} ok, {e(get('counts', 'failed', default=0))} failed, "
        f"{e(get('counts', 'duplicate', default=0))} duplicate; pages: {e(get('pages', 'ocr', default=0))} OCR'd, "
        f"{e(get('pages', 'pdf_text', default=0))} taken from the PDF's own text",
        f"  queue: {e(get('queue', 'ready'))} ready, {e(get('queue', 'claimed'))} claimed, "
        f"{e(get('queue', 'waiting_for_memory'))} waiting for GPU memory, "
        f"{e(get('queue', 'settling'))} still being written",
    ]
    cluster = status.get("cluster")
    for item in _dicts(status.get("in_flight")):
        where = f"child {e(item.get('child_pid'))}"
        if isinstance(cluster, dict):  # a dispatcher: files run on workers (listed below)
            hosts = [
                w.get("host") for w in _dicts(cluster.get("workers")) if item.get("source") in w.get("in_flight", [])
            ]
            where = f"worker {e(hosts[0])}" if hosts else "waiting for a worker"
        lines.append(
            f"  in flight: {e(item.get('source'))} page {e(item.get('page') or 1)}/{e(item.get('pages') or '?')}, "
            f"{e(item.get('elapsed_s'))} s ({where})"
        )
    for child in _dicts(status.get("children") if not isinstance(cluster, dict) else []):
        device = "default device" if child.get("device") is None else f"GPU {e(child.get('device'))}"
        lines.append(
            f"  child pid {e(child.get('pid'))} on {device}: {e(child.get('state'))}, "
            f"{e(child.get('files_done'))} files"
        )
    figures = status.get("metrics")
    if isinstance(figures, dict):
        lines.append(
            f"  oldest file not yet finished: {e(figures.get('oldest_unfinished_age_s'))} s; "
            f"{e(figures.get('pages'))} pages read; last success {e(figures.get('last_success_at') or 'none yet')}"
        )
    if isinstance(cluster, dict):
        lines.append(
            f"  broker {e(cluster.get('broker'))} ({'connected' if cluster.get('connected') else 'NOT connected'}), "
            f"queue {e(cluster.get('queue'))}, {e(cluster.get('submitting'))} waiting to be sent"
        )
        for worker in _dicts(cluster.get("workers")):
            files = ", ".join(e(f) for f in _list(worker.get("in_flight"))) or "nothing"
            lines.append(
                f"  worker {e(worker.get('host'))} ({_device(worker.get('device'))}): {e(worker.get('state'))}, "
                f"{e(worker.get('files_done'))} files, last heard {e(worker.get('last_heartbeat_s'))} s ago; "
                f"in flight: {files}"
            )
    error = status.get("last_error")
    if isinstance(error, dict):
        lines.append(
            f"  last error: {e(error.get('source'))}: {e(error.get('error_code'))}: {e(error.get('detail'))} "
            f"({e(error.get('at'))})"
        )
    handoff = status.get("handoff")  # hooks and webhook: backlog and outcomes since start
    for name, item in sorted(handoff.items()) if isinstance(handoff, dict) else []:
        if isinstance(item, dict):
            lines.append(f"  {e(name)}: " + ", ".join(f"{e(v)} {e(k).replace('_', ' ')}" for k, v in item.items()))
    unavailable = status.get("engine_unavailable")
    if isinstance(unavailable, dict):  # the engine's server is down: files wait (docs/openai.md)
        lines.append(f"  OCR engine unavailable since {e(unavailable.get('since'))}: {e(unavailable.get('detail'))}")
    gpu = status.get("gpu")
    if isinstance(gpu, dict) and gpu.get("available"):
        lines.append(
            f"  GPU: {e(gpu.get('free_mb'))} MB free of {e(gpu.get('total_mb'))} MB "
            f"({e(gpu.get('usage_percent'))}% used)"
        )
    return "\n".join(lines)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _device(device: Any) -> str:
    return "default device" if device is None else f"GPU {escape(device)}"


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
