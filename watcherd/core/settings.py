"""The configuration's shape: one frozen dataclass per section, every key of design §3 a field
with its default. `watcherd.core.config` reads a YAML file into these, once, and they are passed
down; nothing reads the file again.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

DEFAULT_CONFIG = Path("/etc/watcherd/watcherd.yaml")
EX_CONFIG = 78
EX_TEMPFAIL = 75  # a condition a restart may clear (another daemon holds the inbox's lock)

FileMode = NewType("FileMode", int)  # permission bits, written in YAML as 0640 or "0640"
Secret = NewType("Secret", str)  # a string never shown: not in messages, not in repr
WorkerCount = NewType("WorkerCount", object)  # ocr.workers: a whole number >= 1, or "auto"

# Names that scanners, NAS boxes, browsers and office suites leave beside real files.
BUILTIN_IGNORE = (
    ".*",  # hidden files, AppleDouble `._x`, .DS_Store, .stfolder, .watcherd
    "~$*",  # Office lock files
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
    "*.swp",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",  # Synology metadata folders
    "#recycle",  # Synology / QNAP recycle bins
    "#snapshot",
    "$RECYCLE.BIN",
    "lost+found",
)


class ConfigError(Exception):
    """A configuration problem an operator must fix; `str()` names the file and the key."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class PathsSettings:
    inbox: Path | None = None
    outbox: Path | None = None
    failed: Path | None = None
    archive: Path | None = None
    work: Path | None = None  # the processing area; default <inbox>/.watcherd
    state: Path | None = None  # the record key, lock and status file; default $STATE_DIRECTORY


@dataclass(frozen=True)
class WatchSettings:
    mode: Literal["auto", "events", "polling"] = "auto"
    poll_interval_s: float = 2.0
    settle_s: float = 2.0
    rescan_interval_s: float = 300.0
    recursive: bool = True
    include: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff", "*.bmp", "*.webp", "*.pdf")
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class OcrSettings:
    engine: str = "rapidocr"
    model: str | None = None
    prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    python: str | None = None
    timeout_s: float = 300.0
    load_timeout_s: float = 600.0
    devices: tuple[int, ...] | None = None
    max_side_px: int = 4096
    max_pages: int = 500
    max_file_mb: float = 500.0
    recycle_after_files: int = 0
    memory_max_mb: float | None = None  # the child's RLIMIT_DATA; None: no limit
    pdf_text: Literal["use", "ocr"] = "use"  # PDF pages with a text layer: take it, or OCR them anyway
    auto_rotate: bool = True  # turn pages scanned at 90/180/270 degrees upright before OCR
    batch_pages: int = 1  # pages per engine call, for engines with ocr_batch (GPU models: 8-16)
    turn_pages: int = 16  # a longer file is read this many pages at a time, other files between; 0: whole
    workers: WorkerCount = WorkerCount(1)  # CPU hosts: children OCRing at once (watcherd/ocr/workers.py)

    @property
    def max_file_bytes(self) -> int:
        """`max_file_mb` in bytes: what every size check compares a file's size with."""
        return int(self.max_file_mb * 1024 * 1024)


@dataclass(frozen=True)
class GpuSettings:
    min_free_mb: int = 500
    max_usage_percent: float = 95.0
    clear_cache_every: int = 5
    wait_for_memory_s: float = 600.0


Format = Literal["json", "md", "txt", "pdf", "hocr", "alto"]
RENDERED: tuple[Format, ...] = ("pdf", "hocr", "alto")  # built in the child from the file and its positions


@dataclass(frozen=True)
class OutputSettings:
    on_success: Literal["archive", "delete"] = "archive"
    formats: tuple[Format, ...] = ("json", "md")  # what a result is written as
    text_file: Literal["md", "txt", "none"] | None = None  # before `formats`: json + this
    pdfa: bool = False  # the searchable PDF as PDF/A-2b
    locale: Literal["zh-TW", "en"] = "zh-TW"
    file_mode: FileMode = FileMode(0o640)  # result files; folders watcherd creates get x where r
    layout: str = "mirror"  # or a template such as "{yyyy}/{mm}/{dd}/{rel}" (naming.place)

    @property
    def dir_mode(self) -> int:
        return self.file_mode | ((self.file_mode & 0o444) >> 2)

    @property
    def written(self) -> tuple[Format, ...]:
        """The formats written for a result: json and `text_file` when that older key is given,
        else `formats`."""
        if self.text_file is None:
            return self.formats
        return ("json",) if self.text_file == "none" else ("json", self.text_file)

    @property
    def rendered(self) -> tuple[Format, ...]:
        return tuple(f for f in self.written if f in RENDERED)


@dataclass(frozen=True)
class DedupeSettings:
    mode: Literal["off", "skip"] = "off"  # `dedupe: skip` is short for `dedupe: {mode: skip}`
    keep_days: float = 90.0


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    target: Literal["auto", "journal", "stderr"] = "auto"


# What a hook's argv may name (docs/handoff.md); the same values go in WATCHERD_<NAME> variables.
HOOK_PLACEHOLDERS = ("json", "source", "original", "text", "pdf", "status", "error_code", "sha256")


@dataclass(frozen=True)
class HooksSettings:
    on_success: tuple[str, ...] | None = None  # argv, never a shell string
    on_failure: tuple[str, ...] | None = None
    timeout_s: float = 60.0
    max_parallel: int = 2


@dataclass(frozen=True)
class WebhookSettings:
    url: str | None = None
    secret: Secret | None = field(default=None, repr=False)  # never printed, logged or put in status
    secret_file: Path | None = None
    ca_file: Path | None = None
    timeout_s: float = 10.0
    max_age_s: float = 86400.0


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics (docs/metrics.md); both ways out are off by default."""

    textfile: Path | None = None  # node_exporter's textfile collector: a .prom file, replaced atomically
    listen: str | None = None  # "127.0.0.1:9464": HTTP /metrics on that address
    interval_s: float = 5.0  # how often the textfile is rewritten


@dataclass(frozen=True)
class RetentionSettings:
    """Removal of old originals from archive/ and failed/ (docs/retention.md); 0 keeps forever."""

    archive_days: float = 0.0
    failed_days: float = 0.0
    remove_json: bool = False  # failed/: error JSON older than failed_days goes too
    age_from: Literal["ctime", "mtime"] = "ctime"  # ctime: since it was moved there; mtime: the file's own
    interval_s: float = 3600.0  # sweeps: at start, then this often


@dataclass(frozen=True)
class ClusterSettings:
    """Many hosts (docs/cluster.md): a dispatcher sends claimed files to GPU workers through
    Celery on RabbitMQ. `standalone` is the single-host daemon."""

    role: Literal["standalone", "dispatcher", "worker"] = "standalone"
    broker_url: str | None = None  # amqp://user:password@host:5672/vhost; the password is never logged
    queue: str = "watcherd"
    path_map: dict[str, Any] = field(default_factory=dict)  # dispatcher prefix -> worker prefix
    progress_grace_s: float = 120.0  # no word from a file's worker this long: submit it again
    max_deliveries: int = 3  # a file whose worker dies this many times ends as child_crashed
    max_in_flight: int = 4  # files the dispatcher has out at once


@dataclass(frozen=True)
class Settings:
    paths: PathsSettings = field(default_factory=PathsSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    ocr: OcrSettings = field(default_factory=OcrSettings)
    gpu: GpuSettings = field(default_factory=GpuSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    dedupe: DedupeSettings = field(default_factory=DedupeSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    hooks: HooksSettings = field(default_factory=HooksSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: str | None = None  # the file these came from, for messages

    @property
    def work_dir(self) -> Path:
        """The work area: on the inbox's filesystem, so claiming is one rename(2)."""
        assert self.paths.inbox is not None
        return self.paths.work or self.paths.inbox / ".watcherd"

    @property
    def state_dir(self) -> Path:
        assert self.paths.state is not None  # from_dict always sets it
        return self.paths.state

    def require_paths(self) -> None:
        """Check the folder layout the daemon needs (design §2); raises ConfigError."""
        p = self.paths
        for key in ("inbox", "outbox", "failed"):
            if getattr(p, key) is None:
                raise ConfigError("is required", key=f"paths.{key}", source=self.source)
        if self.output.on_success == "archive" and p.archive is None:
            raise ConfigError(
                "is required when output.on_success is 'archive'", key="paths.archive", source=self.source
            )
        inbox = _real(p.inbox)
        for key in ("outbox", "failed", "archive", "work", "state"):
            target = getattr(p, key)
            if target is not None and _real(target).is_relative_to(inbox):
                why = {
                    "work": "everyone who can write the inbox could reach it (leave paths.work unset for "
                    "<inbox>/.watcherd, or put it outside the inbox on the same filesystem)",
                    "state": "its record key and lock must be out of reach of the inbox's writers",
                }.get(key, "results would be picked up again as new scans")
                raise ConfigError(
                    f"{target} is inside the inbox {p.inbox}; {why}", key=f"paths.{key}", source=self.source
                )


def _real(path: Path | None) -> Path:
    assert path is not None
    return Path(os.path.realpath(path))


def redact_url(url: str) -> str:
    """A URL as it may be logged: a password becomes ***, the query (tokens live there) becomes …;
    the user name, host, port and path stay, so the operator can tell which server is meant."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a URL)"
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    if parts.username is not None:
        host = f"{parts.username}{':***' if parts.password is not None else ''}@{host}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def parse_listen(value: str, *, source: str | None = None) -> tuple[str, int]:
    """`metrics.listen` as (host, port): "127.0.0.1:9464", "[::1]:9464" or "localhost:9464"."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " /[]"):
        raise ConfigError(
            f"expected HOST:PORT such as 127.0.0.1:9464 (a port from 1 to 65535), got {value!r}",
            key="metrics.listen",
            source=source,
        )
    return host, int(port)
