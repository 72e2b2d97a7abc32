"""Configuration: one YAML file parsed once into frozen dataclasses and passed down.

Every key of DESIGN §3 is a field here with its default. Unknown keys and wrong types raise
`ConfigError` naming the file and the dotted key; the CLI turns it into exit code 78 (EX_CONFIG)
so systemd's `RestartPreventExitStatus=78` stops a restart loop on a bad config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

import yaml

DEFAULT_CONFIG = Path("/etc/watcherd/watcherd.yaml")
EX_CONFIG = 78
EX_TEMPFAIL = 75  # a condition a restart may clear (another daemon holds the inbox's lock)

FileMode = NewType("FileMode", int)  # permission bits, written in YAML as 0640 or "0640"

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


@dataclass(frozen=True)
class GpuSettings:
    min_free_mb: int = 500
    max_usage_percent: float = 95.0
    clear_cache_every: int = 5
    wait_for_memory_s: float = 600.0


@dataclass(frozen=True)
class OutputSettings:
    on_success: Literal["archive", "delete"] = "archive"
    text_file: Literal["md", "txt", "none"] = "md"
    locale: Literal["zh-TW", "en"] = "zh-TW"
    file_mode: FileMode = FileMode(0o640)  # result files; folders watcherd creates get x where r

    @property
    def dir_mode(self) -> int:
        return self.file_mode | ((self.file_mode & 0o444) >> 2)


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    target: Literal["auto", "journal", "stderr"] = "auto"


@dataclass(frozen=True)
class ClusterSettings:
    """Many hosts (README "Many hosts"): a dispatcher sends claimed files to GPU workers through
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
    logging: LoggingSettings = field(default_factory=LoggingSettings)
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
        """Check the folder layout the daemon needs (DESIGN §2); raises ConfigError."""
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


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--config` wins, then `WATCHERD_CONFIG`, then /etc/watcherd/watcherd.yaml."""
    if explicit:
        return Path(explicit)
    if os.environ.get("WATCHERD_CONFIG"):
        return Path(os.environ["WATCHERD_CONFIG"])
    return DEFAULT_CONFIG


def load(path: str | os.PathLike[str] | None = None, *, env: typing.Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file. Relative paths are taken from the current directory."""
    env = os.environ if env is None else env
    file = config_path(path)
    source = str(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    return from_dict(raw or {}, source=source, env=env)


def from_dict(raw: Any, *, source: str | None = None, env: typing.Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    settings: Settings = _build(Settings, raw, "", source)
    settings = dataclasses.replace(settings, source=source)
    if settings.paths.state is None:
        settings = dataclasses.replace(
            settings, paths=dataclasses.replace(settings.paths, state=default_state_dir(env))
        )
    if env.get("OCR_TIMEOUT"):
        timeout = _convert(float, env["OCR_TIMEOUT"], "ocr.timeout_s (from OCR_TIMEOUT)", source)
        settings = dataclasses.replace(settings, ocr=dataclasses.replace(settings.ocr, timeout_s=timeout))
    _check_ranges(settings)
    return settings


def default_state_dir(env: typing.Mapping[str, str]) -> Path:
    """systemd's StateDirectory= ($STATE_DIRECTORY), else $XDG_STATE_HOME/watcherd, else
    ~/.local/state/watcherd: a folder only the daemon's user can write, never the inbox."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "watcherd"


def _check_ranges(s: Settings) -> None:
    positive = {
        "watch.poll_interval_s": s.watch.poll_interval_s,
        "watch.rescan_interval_s": s.watch.rescan_interval_s,
        "ocr.timeout_s": s.ocr.timeout_s,
        "ocr.load_timeout_s": s.ocr.load_timeout_s,
        "ocr.max_side_px": s.ocr.max_side_px,
        "ocr.max_pages": s.ocr.max_pages,
        "ocr.max_file_mb": s.ocr.max_file_mb,
        "gpu.clear_cache_every": s.gpu.clear_cache_every,
    }
    not_negative = {
        "watch.settle_s": s.watch.settle_s,
        "ocr.recycle_after_files": s.ocr.recycle_after_files,
        "gpu.min_free_mb": s.gpu.min_free_mb,
        "gpu.wait_for_memory_s": s.gpu.wait_for_memory_s,
    }
    if s.ocr.memory_max_mb is not None:
        positive["ocr.memory_max_mb"] = s.ocr.memory_max_mb
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"must be greater than 0, got {value}", key=key, source=s.source)
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"must not be negative, got {value}", key=key, source=s.source)
    if not 0 < s.gpu.max_usage_percent <= 100:
        raise ConfigError("must be in (0, 100]", key="gpu.max_usage_percent", source=s.source)
    if not s.watch.include:
        raise ConfigError("must list at least one pattern", key="watch.include", source=s.source)
    _check_cluster(s)
    if s.ocr.devices is not None and (not s.ocr.devices or len(set(s.ocr.devices)) != len(s.ocr.devices)):
        raise ConfigError("must be null or a list of distinct GPU indices", key="ocr.devices", source=s.source)


def _check_cluster(s: Settings) -> None:
    c = s.cluster
    for key, value in {
        "cluster.progress_grace_s": c.progress_grace_s,
        "cluster.max_deliveries": c.max_deliveries,
        "cluster.max_in_flight": c.max_in_flight,
    }.items():
        if value <= 0:
            raise ConfigError(f"must be greater than 0, got {value}", key=key, source=s.source)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", c.queue):
        raise ConfigError("must be 1-100 letters, digits, '_', '.' or '-'", key="cluster.queue", source=s.source)
    for prefix, target in c.path_map.items():
        if not os.path.isabs(prefix) or not isinstance(target, str) or not os.path.isabs(target):
            raise ConfigError(
                f"must map absolute folders to absolute folders, got {prefix!r}: {target!r}",
                key="cluster.path_map",
                source=s.source,
            )
    if c.role == "standalone":
        return
    if not c.broker_url:
        raise ConfigError(f"is required when cluster.role is {c.role!r}", key="cluster.broker_url", source=s.source)
    if not re.match(r"(amqp|amqps|pyamqp)://", c.broker_url):
        raise ConfigError(
            f"must be an amqp:// or amqps:// URL (RabbitMQ), got {mask_url(c.broker_url)!r}",
            key="cluster.broker_url",
            source=s.source,
        )


def mask_url(url: str) -> str:
    """A broker URL fit for logs: the password replaced by ***."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def _build(cls: type, raw: Any, prefix: str, source: str | None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {_describe(raw)}", key=prefix.rstrip(".") or None, source=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown key (known: {known})", key=f"{prefix}{key}", source=source)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type, hint), value if value is not None else {}, f"{key}.", source)
        else:
            values[name] = _convert(hint, value, key, source)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str | None) -> Any:
    """Check `value` against a type hint; return it in the dataclass's representation."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, source)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"must be one of {choices}, got {value!r}", key=key, source=source)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_describe(value)}", key=key, source=source)
        return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"expected a mapping, got {_describe(value)}", key=key, source=source)
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_describe(value)}", key=key, source=source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected a whole number, got {_describe(value)}", key=key, source=source)
        return value
    if hint is float:
        number: float | None = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # a whole number of 400 digits
                number = math.inf
        if number is None:
            raise ConfigError(f"expected a number, got {_describe(value)}", key=key, source=source)
        # YAML's .nan/.inf and OCR_TIMEOUT=nan parse as floats, and NaN passes every range check
        # (nan <= 0 is False): a timeout of NaN never fires. Numbers must be finite (DESIGN §3).
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {value!r}", key=key, source=source)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", key=key, source=source)
        return value
    if hint is FileMode:
        bits = value
        if isinstance(value, str) and value.isdigit():
            bits = int(value, 8)  # "0640" in quotes; unquoted YAML 0640 is already octal
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 0o666:
            raise ConfigError(
                f"expected permission bits such as 0640 (at most 0666), got {_describe(value)}", key=key, source=source
            )
        return FileMode(bits)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a folder path, got {_describe(value)}", key=key, source=source)
        return Path(os.path.abspath(os.path.expanduser(value)))
    raise TypeError(f"unsupported setting type {hint!r} for {key}")  # a bug here, not in the config


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"
