"""Throughput: the `openai` engine against a loopback server, and the embedded engine with
`ocr.workers`, each beside the same work done without watcherd.

    .venv/bin/python benchmarks/throughput.py [--pages 48] [--copies 5] [--rounds 3] [--only openai|embedded]

Each measurement runs --rounds times, the rows interleaved round-robin (the build machine is shared:
a neighbour's load then spreads over every row instead of sinking one); the table shows the median
and the range.

openai: tests/openai_server.py in a process of its own, answering each request after 100 ms, at
most 8 at once (a server whose batch holds 8). "direct" posts the same prebuilt request with httpx
from a thread pool of the same size (the best a client can do); "engine" is OpenAiEngine called in
this process (`ocr_batch` with 8 pages a call, PNG encoding included); "daemon" is a running
watcherd given one-page files, timed from the first claim to the last result (auto_rotate off
unless the row says otherwise: the orientation pass is the CPU's work, not the server's).

embedded: rapidocr on the sample pages, in N processes each running its share of the pages with
its onnxruntime intra-op threads set (or left at the default), against the daemon with
`ocr.workers` N (from the first claim to the last result, models warmed first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from harness import REPO, SAMPLES, BenchDaemon, iso, machine, table, wait_for

sys.path.insert(0, str(REPO))  # watcherd and tests.openai_server, here and in spawned processes

NAMES = ["memo_en.png", "receipt_zh.jpg", "two_pages.tif"]
LATENCY_S = 0.1
CAPACITY = 8


# -- openai ----------------------------------------------------------------------------------------


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--latency-s", str(LATENCY_S), "--capacity", str(CAPACITY)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def page_image() -> Any:
    from PIL import Image

    return Image.open(SAMPLES / "receipt_zh.jpg").convert("RGB")


def direct(url: str, pages: int, concurrency: int, *, encode: bool = False) -> float:
    """Seconds for `pages` requests straight to the server, `concurrency` at a time: one prebuilt
    request, or (`encode`) each page encoded as its request is built, as any client must."""
    import httpx

    from watcherd.ocr.engines.openai import DEFAULT_PROMPT, data_url

    image = page_image()

    def request() -> str:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": DEFAULT_PROMPT},
        ]
        message = {"role": "user", "content": content}
        return json.dumps({"model": "test-ocr", "max_tokens": 4096, "temperature": 0.0, "messages": [message]})

    prebuilt = request()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits, trust_env=False, timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:

        def post(_: int) -> None:
            body = request() if encode else prebuilt
            client.post(url + "/chat/completions", content=body.encode()).raise_for_status()

        list(pool.map(post, range(concurrency)))  # warm: connections open, as the engine's will be
        started = time.perf_counter()
        list(pool.map(post, range(pages)))
        return time.perf_counter() - started


def engine_batches(url: str, pages: int, concurrency: int) -> float:
    from watcherd.ocr.engines.openai import OpenAiEngine

    engine = OpenAiEngine(model="test-ocr", base_url=url, concurrency=concurrency)
    image = page_image()
    engine.ocr_batch([image] * concurrency)  # warm
    started = time.perf_counter()
    for first in range(0, pages, 8):
        engine.ocr_batch([image] * min(8, pages - first))
    elapsed = time.perf_counter() - started
    engine.close()
    return elapsed


def through_daemon(ocr: dict[str, Any], files: int, workers: int, source: Path) -> float:
    """Seconds from the first claim to the last result for `files` one-page files."""
    daemon = BenchDaemon(ocr={**ocr, "workers": workers, "timeout_s": 120}).start()
    try:
        for i in range(workers):  # one warm-up file per child (an idle child takes the next file)
            shutil.copy(source, daemon.inbox / f"warmup-{i}{source.suffix}")
        wait_for(lambda: len(daemon.results()) == workers, 300, "warm-up results")
        for i in range(files):
            shutil.copy(source, daemon.inbox / f"{i:04d}{source.suffix}")
        wait_for(lambda: len(daemon.results()) == workers + files, 900, "all results")
        docs = [d for d in daemon.documents() if not d["source"].startswith("warmup-")]
    finally:
        daemon.stop()
    assert all(d["status"] == "ok" for d in docs), [d.get("detail") for d in docs if d["status"] != "ok"][:3]
    return max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs)


def through_daemon_one_file(ocr: dict[str, Any], pages: int, batch: int, source: Path) -> float:
    """Seconds from claim to result for one `pages`-page TIFF, `batch` pages per engine call."""
    from PIL import Image

    daemon = BenchDaemon(ocr={**ocr, "batch_pages": batch, "timeout_s": 120}).start()
    try:
        image = Image.open(source).convert("RGB")
        tiff = Path(daemon.tmp.name) / "long.tif"
        image.save(tiff, save_all=True, append_images=[image] * (pages - 1))
        tiff.rename(daemon.inbox / "long.tif")
        wait_for(lambda: len(daemon.results()) == 1, 900, "the result")
        (doc,) = daemon.documents()
    finally:
        daemon.stop()
    assert doc["status"] == "ok" and len(doc["pages"]) == pages, doc.get("detail")
    return iso(doc["finished_at"]) - iso(doc["received_at"])


def batch_runs(url: str, png: Path, pages: int) -> dict[str, Callable[[], float]]:
    runs: dict[str, Callable[[], float]] = {}
    for c in (1, 8):
        for rotate in (False, True):
            ocr = {
                "engine": "openai",
                "model": "test-ocr",
                "auto_rotate": rotate,
                "options": {"base_url": url, "concurrency": c},
            }
            label = (
                f"daemon, one {pages}-page file, concurrency {c}, batch_pages {c}, auto_rotate {str(rotate).lower()}"
            )
            runs[label] = partial(through_daemon_one_file, ocr, pages, c, png)
    return runs


@contextlib.contextmanager
def server_and_page() -> Iterator[tuple[str, Path]]:
    """The loopback OpenAI-compatible server's URL and the page as a PNG file, both gone after."""
    server, url = start_server()
    tmp = tempfile.TemporaryDirectory(prefix="watcherd-bench-")
    png = Path(tmp.name) / "page.png"
    page_image().save(png)
    try:
        yield url, png
    finally:
        server.kill()
        server.wait()
        tmp.cleanup()


def bench_batches(pages: int, rounds: int) -> str:
    """One multi-page file through one child: pages in flight via ocr.batch_pages (the batch feed)."""
    with server_and_page() as (url, png):
        rates = interleaved({k: (lambda f=f: pages / f()) for k, f in batch_runs(url, png, pages).items()}, rounds)
    first = statistics.median(next(iter(rates.values())))
    rows = [
        [label, pages, f"{statistics.median(v):.2f}", spread(v), f"{statistics.median(v) / first:.2f}"]
        for label, v in rates.items()
    ]
    title = (
        f"openai engine through the daemon, one multi-page file, loopback server {LATENCY_S * 1000:.0f} ms a "
        f"request, capacity {CAPACITY}; median of {rounds} interleaved rounds; {machine()}"
    )
    return table(title, ["path", "pages", "pages/s", "range", "vs concurrency 1"], rows)


def openai_runs(url: str, png: Path, pages: int) -> dict[str, Callable[[], float]]:
    runs: dict[str, Callable[[], float]] = {}
    for c in (1, 8):
        runs[f"direct httpx, {c} in flight, one prebuilt request"] = partial(direct, url, pages, c)
        runs[f"direct httpx, {c} in flight, encoding each page"] = partial(direct, url, pages, c, encode=True)
        runs[f"engine.ocr_batch(8 pages) called directly, concurrency {c}"] = partial(engine_batches, url, pages, c)

    def ocr(concurrency: int, *, rotate: bool = False) -> dict[str, Any]:
        options = {"base_url": url, "concurrency": concurrency}
        return {"engine": "openai", "model": "test-ocr", "auto_rotate": rotate, "options": options}

    runs["daemon, concurrency 1, workers 1"] = partial(through_daemon, ocr(1), pages, 1, png)
    runs["daemon, concurrency 8, batch_pages 8, workers 1 (one-page files share batches)"] = partial(
        through_daemon, {**ocr(8), "batch_pages": 8}, pages, 1, png
    )
    runs["daemon, concurrency 8, batch_pages 8, workers 1, auto_rotate true"] = partial(
        through_daemon, {**ocr(8, rotate=True), "batch_pages": 8}, pages, 1, png
    )
    runs["daemon, concurrency 1, workers 8"] = partial(through_daemon, ocr(1), pages, 8, png)
    return runs


def bench_openai(pages: int, rounds: int) -> str:
    with server_and_page() as (url, png):
        rates = interleaved({k: (lambda f=f: pages / f()) for k, f in openai_runs(url, png, pages).items()}, rounds)
    rows = []
    for label, values in rates.items():
        c = 8 if (" 8 in flight" in label or "concurrency 8" in label or "workers 8" in label) else 1
        base = statistics.median(rates[f"direct httpx, {c} in flight, one prebuilt request"])
        encoding = statistics.median(rates[f"direct httpx, {c} in flight, encoding each page"])
        rate = statistics.median(values)
        rows.append([label, pages, f"{rate:.2f}", spread(values), f"{rate / base:.2f}", f"{rate / encoding:.2f}"])
    title = (
        f"openai engine, loopback server {LATENCY_S * 1000:.0f} ms a request, capacity {CAPACITY}; "
        f"median of {rounds} interleaved rounds; {machine()}"
    )
    header = ["path", "pages", "pages/s", "range", "vs direct, prebuilt", "vs direct, encoding"]
    return table(title, header, rows)


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measurement `rounds` times, round-robin, so a neighbour's load spreads over all rows."""
    results: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            results[label].append(run())
            print(f"  {label}: {results[label][-1]:.2f}", file=sys.stderr, flush=True)
    return results


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


# -- embedded --------------------------------------------------------------------------------------


def _rapidocr_process(pages: list[int], copies: int, threads: int | None, barrier: Any, out: Any) -> None:
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["WATCHERD_OCR_THREADS"] = str(threads)
    import logging

    from watcherd.ocr.child.decode import Document
    from watcherd.ocr.engines.rapidocr import RapidOcrEngine

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)

    images = [
        p.image
        for _ in range(copies)
        for n in NAMES
        for p in Document((SAMPLES / n).read_bytes(), max_side_px=4096, max_pages=500)
    ]
    engine = RapidOcrEngine()
    engine.ocr(images[0])  # warm: sessions start on the first page
    barrier.wait()
    started = time.time()
    for i in pages:
        engine.ocr(images[i])
    out.put((started, time.time()))


def direct_rapidocr(processes: int, threads: int | None, copies: int) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    total = 4 * copies  # the samples hold 4 pages
    barrier, out = context.Barrier(processes), context.Queue()
    procs = [
        context.Process(
            target=_rapidocr_process, args=(list(range(i, total, processes)), copies, threads, barrier, out)
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    spans = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return total, max(e for _, e in spans) - min(s for s, _ in spans)


def through_daemon_embedded(workers: int, copies: int) -> tuple[int, float]:
    daemon = BenchDaemon(ocr={"engine": "rapidocr", "workers": workers}).start()
    try:
        for i in range(workers):
            shutil.copy(SAMPLES / "memo_en.png", daemon.inbox / f"warmup-{i}.png")
        wait_for(lambda: len(daemon.results()) == workers, 300, "warm-up results")
        for i in range(copies):
            for name in NAMES:
                shutil.copy(SAMPLES / name, daemon.inbox / f"{i}-{name}")
        wait_for(lambda: len(daemon.results()) == workers + copies * len(NAMES), 900, "all results")
        docs = [d for d in daemon.documents() if not d["source"].startswith("warmup-")]
    finally:
        daemon.stop()
    assert all(d["status"] == "ok" for d in docs)
    pages = sum(len(d["pages"]) for d in docs)
    return pages, max(iso(d["finished_at"]) for d in docs) - min(iso(d["received_at"]) for d in docs)


def bench_embedded(copies: int, rounds: int) -> str:
    from watcherd.ocr.workers import cores

    n = cores()
    runs: dict[str, Callable[[], float]] = {}
    configs = [(1, None), (1, 1), (n, 1), (n, None)] if n > 1 else [(1, None), (1, 1)]
    for processes, threads in configs:
        label = f"rapidocr directly, {processes} process(es) × {threads or 'default'} thread(s)"
        runs[label] = partial(rate, direct_rapidocr, processes, threads, copies)
    for workers in (1, n) if n > 1 else (1,):
        threads = "default" if workers == 1 else max(1, n // workers)
        runs[f"daemon, ocr.workers {workers} (× {threads} thread(s))"] = partial(
            rate, through_daemon_embedded, workers, copies
        )
    rates = interleaved(runs, rounds)
    median = {label: statistics.median(values) for label, values in rates.items()}
    today = median["rapidocr directly, 1 process(es) × default thread(s)"]
    same = {  # the direct row with the daemon's processes and threads
        "daemon, ocr.workers 1 (× default thread(s))": "rapidocr directly, 1 process(es) × default thread(s)",
        f"daemon, ocr.workers {n} (× {max(1, n // n)} thread(s))": f"rapidocr directly, {n} process(es) × 1 thread(s)",
    }
    rows = []
    for label, values in rates.items():
        versus = f"{median[label] / median[same[label]]:.2f}" if label in same else ""
        rows.append([label, 4 * copies, f"{median[label]:.2f}", spread(values), f"{median[label] / today:.2f}", versus])
    title = (
        f"Embedded engine (rapidocr) on the samples × {copies}; {n} usable cores; median of {rounds} interleaved "
        f"rounds; {machine()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    header = [
        "path",
        "pages",
        "pages/s",
        "range",
        "vs 1 process × default threads",
        "daemon vs direct, same processes × threads",
    ]
    return table(title, header, rows)


def rate(measure: Callable[..., tuple[int, float]], *args: Any) -> float:
    pages, seconds = measure(*args)
    return pages / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=48, help="openai: pages per measurement")
    parser.add_argument("--copies", type=int, default=5, help="embedded: copies of the 3 samples (4 pages)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the table shows medians")
    parser.add_argument("--only", choices=["openai", "embedded", "batches"])
    args = parser.parse_args()
    if args.only in (None, "openai"):
        print(bench_openai(args.pages, args.rounds), flush=True)
        print()
    if args.only in (None, "batches"):
        print(bench_batches(args.pages, args.rounds), flush=True)
        print()
    if args.only in (None, "embedded"):
        print(bench_embedded(args.copies, args.rounds), flush=True)


if __name__ == "__main__":
    main()
