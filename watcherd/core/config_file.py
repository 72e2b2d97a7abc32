"""Reading the configuration: one YAML file parsed once into the dataclasses of `settings`.

Unknown keys and wrong types raise `ConfigError` naming the file and the dotted key; the CLI turns
it into exit code 78 (EX_CONFIG) so systemd's `RestartPreventExitStatus=78` stops a restart loop
on a bad config. Ranges and combinations of keys are checked here too, once, at load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import string
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml

from watcherd.core import naming
from watcherd.core.settings import (
    DEFAULT_CONFIG,
    HOOK_PLACEHOLDERS,
    ConfigError,
    FileMode,
    OutputSettings,
    Secret,
    Settings,
    WorkerCount,
    parse_listen,
    redact_url,
)


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
    settings: Settings = _build(Settings, _dedupe_shorthand(raw), "", source)
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


def _dedupe_shorthand(raw: Any) -> Any:
    """`dedupe: skip` means `dedupe: {mode: skip}`; YAML reads a bare `off` as false."""
    if not isinstance(raw, dict) or "dedupe" not in raw:
        return raw
    dedupe = raw["dedupe"]
    if isinstance(dedupe, (str, bool)):
        dedupe = {"mode": dedupe}
    if isinstance(dedupe, dict) and isinstance(dedupe.get("mode"), bool):
        dedupe = {**dedupe, "mode": "on" if dedupe["mode"] else "off"}  # `on` is no mode: the error says so
    return {**raw, "dedupe": dedupe}


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
        "ocr.batch_pages": s.ocr.batch_pages,
        "gpu.clear_cache_every": s.gpu.clear_cache_every,
        "metrics.interval_s": s.metrics.interval_s,
        "retention.interval_s": s.retention.interval_s,
        "dedupe.keep_days": s.dedupe.keep_days,
        "hooks.timeout_s": s.hooks.timeout_s,
        "hooks.max_parallel": s.hooks.max_parallel,
        "webhook.timeout_s": s.webhook.timeout_s,
        "webhook.max_age_s": s.webhook.max_age_s,
    }
    not_negative = {
        "watch.settle_s": s.watch.settle_s,
        "ocr.recycle_after_files": s.ocr.recycle_after_files,
        "ocr.turn_pages": s.ocr.turn_pages,
        "gpu.min_free_mb": s.gpu.min_free_mb,
        "gpu.wait_for_memory_s": s.gpu.wait_for_memory_s,
        "retention.archive_days": s.retention.archive_days,
        "retention.failed_days": s.retention.failed_days,
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
    layout_problem = naming.layout_problem(s.output.layout)
    if layout_problem is not None:
        raise ConfigError(layout_problem, key="output.layout", source=s.source)
    if not s.watch.include:
        raise ConfigError("must list at least one pattern", key="watch.include", source=s.source)
    formats = s.output.formats
    if s.output.text_file is not None and formats != OutputSettings.formats:
        raise ConfigError(
            "is replaced by output.formats; give one of them (text_file: txt is formats: [json, txt])",
            key="output.text_file",
            source=s.source,
        )
    if "json" not in formats:
        raise ConfigError("must include json (the result document)", key="output.formats", source=s.source)
    if len(set(formats)) != len(formats):
        raise ConfigError("lists a format twice", key="output.formats", source=s.source)
    if s.output.pdfa and "pdf" not in s.output.written:
        raise ConfigError("needs pdf in output.formats", key="output.pdfa", source=s.source)
    if s.metrics.listen is not None:
        parse_listen(s.metrics.listen, source=s.source)
    if s.metrics.textfile is not None and s.metrics.textfile.suffix != ".prom":
        raise ConfigError(
            f"must end in .prom (node_exporter's textfile collector reads only those), got {s.metrics.textfile}",
            key="metrics.textfile",
            source=s.source,
        )
    _check_cluster(s)
    if s.ocr.devices is not None and (not s.ocr.devices or len(set(s.ocr.devices)) != len(s.ocr.devices)):
        raise ConfigError("must be null or a list of distinct GPU indices", key="ocr.devices", source=s.source)
    if s.ocr.devices and s.ocr.workers not in (1, "auto"):  # auto with GPUs: one child per device
        raise ConfigError(
            "must be 1 or auto with ocr.devices (one child per GPU); more are for CPU hosts (ocr.devices: null)",
            key="ocr.workers",
            source=s.source,
        )
    _check_hand_off(s)


def _check_hand_off(s: Settings) -> None:
    """hooks.* and webhook.*: an argv whose placeholders we know, a URL we may POST to."""
    for key in ("on_success", "on_failure"):
        argv = getattr(s.hooks, key)
        if argv is None:
            continue
        if not argv or not argv[0]:
            raise ConfigError(
                "must name a program: a list such as [/usr/local/bin/x, '{json}']", key=f"hooks.{key}", source=s.source
            )
        for i, arg in enumerate(argv):
            try:
                fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(arg) if f is not None]
            except ValueError as exc:  # a lone { or }: write {{ and }} for the characters themselves
                raise ConfigError(
                    f"{exc} in {arg!r} (write {{{{ for a literal {{)", key=f"hooks.{key}[{i}]", source=s.source
                ) from None
            for name, spec, conversion in fields:
                if name not in HOOK_PLACEHOLDERS or spec or conversion:
                    known = ", ".join(f"{{{p}}}" for p in HOOK_PLACEHOLDERS)
                    raise ConfigError(
                        f"unknown placeholder {{{name}}} in {arg!r} (known: {known})",
                        key=f"hooks.{key}[{i}]",
                        source=s.source,
                    )
    w = s.webhook
    if w.url is not None:
        url = urllib.parse.urlsplit(w.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"must be an http:// or https:// URL with a host, got {redact_url(w.url)!r}",
                key="webhook.url",
                source=s.source,
            )
    if w.secret is not None and w.secret_file is not None:
        raise ConfigError(
            "set webhook.secret or webhook.secret_file, not both", key="webhook.secret_file", source=s.source
        )


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
            f"must be an amqp:// or amqps:// URL (RabbitMQ), got {redact_url(c.broker_url)!r}",
            key="cluster.broker_url",
            source=s.source,
        )


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
        # (nan <= 0 is False): a timeout of NaN never fires. Numbers must be finite (design §3).
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {value!r}", key=key, source=source)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", key=key, source=source)
        return value
    if hint is Secret:
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"expected a non-empty string, got {type(value).__name__} (not shown)", key=key, source=source
            )
        return Secret(value)
    if hint is FileMode:
        bits = value
        if isinstance(value, str) and value.isdigit():
            bits = int(value, 8)  # "0640" in quotes; unquoted YAML 0640 is already octal
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 0o666:
            raise ConfigError(
                f"expected permission bits such as 0640 (at most 0666), got {_describe(value)}", key=key, source=source
            )
        return FileMode(bits)
    if hint is WorkerCount:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return WorkerCount(value)
        raise ConfigError(
            f"expected a whole number of at least 1 or auto, got {_describe(value)}", key=key, source=source
        )
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a folder path, got {_describe(value)}", key=key, source=source)
        return Path(os.path.abspath(os.path.expanduser(value)))
    raise TypeError(f"unsupported setting type {hint!r} for {key}")  # a bug here, not in the config


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"
