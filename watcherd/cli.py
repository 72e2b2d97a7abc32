"""Command line: `watcherd run | check | ocr FILE...` (design §4).

Exit codes: 0 fine; 1 something failed (a file, a check, the engine at run time); 75 (EX_TEMPFAIL)
another daemon holds the inbox, which a restart may clear; 78 (EX_CONFIG) the configuration is
wrong, which only the operator can fix — systemd's RestartPreventExitStatus=78 keeps that from
looping. `watcherd status` answers like `systemctl status`: 0 running, 3 not running, 1 not
responding.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path

from watcherd import __version__
from watcherd.core import config_file, logs
from watcherd.core import settings as settings_mod
from watcherd.core.naming import now_iso, public_path
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import EX_CONFIG, EX_TEMPFAIL, ConfigError, Settings
from watcherd.ocr.supervisor import EngineLoadError, Worker, probe_engine
from watcherd.ops import check, report, retry
from watcherd.outputs.documents import document_for, precheck
from watcherd.work.spool import LockHeld

log = logging.getLogger("watcherd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="watcherd", description="OCR hot-folder daemon")
    parser.add_argument("--version", action="version", version=f"watcherd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the daemon in the foreground"),
        ("check", "validate config, folders, permissions and engine"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="config file (default: $WATCHERD_CONFIG or /etc/watcherd/watcherd.yaml)")
    p = sub.add_parser("worker", help="a GPU worker for a dispatcher (cluster.role: worker)")
    p.add_argument("--config", help="config file (default: $WATCHERD_CONFIG or /etc/watcherd/watcherd.yaml)")
    p.add_argument("--device", type=int, help="the GPU this worker uses (overrides ocr.devices)")
    p.add_argument("--name", help="how the dispatcher names this worker (default: host name, /gpuN)")
    p = sub.add_parser("status", help="what the running daemon is doing")
    p.add_argument("--config", help="config file (to find the daemon's work area)")
    p.add_argument("--json", action="store_true", help="print the status file as JSON")
    p = sub.add_parser("retry", help="move failed originals back into the inbox")
    p.add_argument("pattern", nargs="?", default="*", help="glob relative to the failed folder (default: all)")
    p.add_argument("--config", help="config file")
    p = sub.add_parser("ocr", help="OCR files now through the supervised child; prints JSON")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--config", help="config file for the ocr.* settings (optional)")
    p.add_argument("--engine", help="override ocr.engine")
    args = parser.parse_args(argv)
    if args.command in ("status", "check", "retry"):
        # `watcherd status | head`: end quietly when the reader goes, like any Unix tool (not for
        # run and ocr, which write to children's pipes and handle EPIPE themselves).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "retry":
            return cmd_retry(args)
        return cmd_ocr(args)
    except ConfigError as exc:
        print(f"watcherd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    from watcherd.daemon.service import Service

    faulthandler.enable()  # systemd's watchdog SIGABRT then shows where the main loop was stuck
    settings = config_file.load(args.config)
    logs.setup(settings.logging.level, settings.logging.target)
    if settings.cluster.role == "worker":
        raise ConfigError("is 'worker': start it with `watcherd worker`", key="cluster.role", source=settings.source)
    if settings.cluster.role == "dispatcher":
        _need_celery(settings)
    settings.require_paths()
    _prepare_folders(settings)
    missing = [c for c in check.folders(settings) if not c.ok]
    if missing:  # say exactly which folder lacks which permission, before anything is claimed
        raise ConfigError(missing[0].detail, key=missing[0].key, source=settings.source)
    try:
        return Service(settings).run()
    except LockHeld as exc:
        log.critical("%s", exc)
        return EX_TEMPFAIL
    except EngineLoadError as exc:
        if exc.config_error:
            log.critical("Cannot load the OCR engine (check ocr.engine and ocr.options): %s", exc)
            return EX_CONFIG
        log.critical("The OCR engine keeps failing to load, giving up: %s", exc)
        return 1


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker on this host's GPU (docs/cluster.md); it needs no folders of its own."""
    settings = config_file.load(args.config)
    logs.setup(settings.logging.level, settings.logging.target)
    if settings.cluster.role != "worker":
        raise ConfigError(
            f"must be 'worker' for `watcherd worker`, got {settings.cluster.role!r}",
            key="cluster.role",
            source=settings.source,
        )
    if args.device is not None:
        settings = dataclasses.replace(settings, ocr=dataclasses.replace(settings.ocr, devices=(args.device,)))
    _need_celery(settings)
    problem = probe_engine(settings.ocr)  # a bad ocr.engine is exit 78 before any broker traffic
    if problem is not None:
        raise ConfigError(problem, key="ocr.engine", source=settings.source)
    from watcherd.cluster import worker

    return worker.run(settings, name=args.name)


def _need_celery(settings: Settings) -> None:
    try:
        import celery  # noqa: F401
    except ImportError as exc:  # the `cluster` extra is not installed
        raise ConfigError(
            f"{settings.cluster.role!r} needs Celery ({exc}); install watcherd[cluster]",
            key="cluster.role",
            source=settings.source,
        ) from None


def _prepare_folders(settings: Settings) -> None:
    inbox = settings.paths.inbox
    assert inbox is not None
    if not inbox.is_dir():
        raise ConfigError(f"{inbox} is not an existing folder", key="paths.inbox", source=settings.source)
    for key in ("outbox", "failed", "archive", "state"):
        folder = getattr(settings.paths, key)
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700 if key == "state" else 0o777)
        except OSError as exc:
            raise ConfigError(
                f"cannot create {folder}: {exc.strerror}", key=f"paths.{key}", source=settings.source
            ) from None


def cmd_check(args: argparse.Namespace) -> int:
    settings = config_file.load(args.config)
    settings.require_paths()
    return check.report(settings)


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon runs, 3 when it does not, 1 when it does not respond (like
    `systemctl status`). Never hangs, never a traceback: the status file is untrusted input."""
    explicit = args.config or os.environ.get("WATCHERD_CONFIG")
    if not explicit and not settings_mod.DEFAULT_CONFIG.exists():
        print("watcherd: no configuration found: give --config", file=sys.stderr)
        return 3
    settings = config_file.load(explicit)
    settings.require_paths()
    path = report.status_file(settings)
    status = report.load_status(path)
    if isinstance(status, str):
        print(f"watcherd: {logs.escape(status)}", file=sys.stderr)
        return 3
    print(json.dumps(status, ensure_ascii=True, indent=2) if args.json else report.format_status(status))
    return report.liveness(status)[1]


def cmd_retry(args: argparse.Namespace) -> int:
    settings = config_file.load(args.config)
    settings.require_paths()
    moved = retry.retry(settings, args.pattern)
    for original, back in moved:
        print(f"{logs.escape(original)} → inbox/{logs.escape(back)}")  # names from the inbox
    print(f"{len(moved)} file(s) back in the inbox")
    return 0


def cmd_ocr(args: argparse.Namespace) -> int:
    explicit = args.config or os.environ.get("WATCHERD_CONFIG")
    if explicit or settings_mod.DEFAULT_CONFIG.exists():
        settings = config_file.load(explicit)
    else:
        settings = config_file.from_dict({})
    if args.engine:
        settings = dataclasses.replace(settings, ocr=dataclasses.replace(settings.ocr, engine=args.engine))
    logs.setup("warning" if len(args.files) > 1 else settings.logging.level)
    worker = Worker(ocr=settings.ocr, gpu=settings.gpu)
    documents = []
    progress = None
    if len(args.files) > 1:
        from tqdm import tqdm

        progress = tqdm(total=len(args.files), unit="file", file=sys.stderr)
    try:
        worker.spawn()
        for path in args.files:
            job = Job(rel=path.name, path=Path(os.path.abspath(path)), received_at=now_iso())
            try:
                outcome = precheck(job, os.lstat(path), settings)
            except OSError as exc:
                outcome = Outcome(job=job, ok=False, code="unreadable", detail=exc.strerror or str(exc))
            outcome = outcome or _run_one(worker, job)
            document, _ = document_for(outcome, settings=settings, received_at=job.received_at)
            document["image_path"] = public_path(job.path)
            documents.append(document)
            if progress is not None:
                progress.update()
    except EngineLoadError as exc:
        print(f"watcherd: cannot load the OCR engine: {exc}", file=sys.stderr)
        return EX_CONFIG if exc.config_error else 1
    finally:
        worker.stop(wait_s=5.0)
        if progress is not None:
            progress.close()
    output = documents[0] if len(documents) == 1 else documents
    print(json.dumps(output, ensure_ascii=False, indent=2))
    return 0 if all(d["status"] == "ok" for d in documents) else 1


def _run_one(worker: Worker, job: Job) -> Outcome:
    """Drive one file through the worker, respawning and retrying exactly as the daemon does."""
    assigned = False
    while True:
        if worker.ready and not assigned:
            assigned = worker.assign(job)
        due = worker.next_wakeup()
        timeout = None if due is None else max(0.0, due - worker.clock())
        if worker.conn_in is not None:
            wait([worker.conn_in.fileno()], timeout)
        elif timeout:
            time.sleep(timeout)  # a crashed child's respawn backoff
        for outcome in worker.pump() + worker.tick():
            if outcome.retry:
                assigned = False
            else:
                return outcome
