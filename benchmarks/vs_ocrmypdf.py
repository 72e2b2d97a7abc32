"""Searchable PDF: watcherd (`output.formats: [json, pdf]`) vs OCRmyPDF with the ocrmypdf-rapidocr plugin.

    python3 -m venv /tmp/ocrmypdf-venv
    /tmp/ocrmypdf-venv/bin/pip install ocrmypdf==17.13.0 ocrmypdf-rapidocr==1.0.1
    cd benchmarks && ../.venv/bin/python vs_ocrmypdf.py --ocrmypdf /tmp/ocrmypdf-venv/bin/ocrmypdf \
        --stub-tesseract [--repeat 3]

OCRmyPDF lives in a throw-away venv (never in watcherd's) and runs as a subprocess. Each repeat
goes through the samples once and, per sample, runs the tools one after the other (interleaved, so
the shared machine's load falls on all alike):

- **watcherd**: one warm daemon (embedded RapidOCR, formats json + pdf) for the whole run; the
  file is renamed into the inbox and the wall time runs until its result JSON is published (the PDF
  is published before it). Its settle time (`watch.settle_s: 0.2`) is in that wall time; the JSON's
  `finished_at - received_at` (claim to publication) and the pages' `processing_time` (inside the
  engine) are reported too.
- **ocrmypdf CLI**: `ocrmypdf --plugin ocrmypdf_rapidocr -l chi_tra --output-type pdf --image-dpi 300
  IN OUT`, one process per file as a shell script or cron job would run it (start-up and model
  load every time).
- **ocrmypdf API, warm**: `ocrmypdf.ocr(...)` with the same options in one long-lived process of the
  throw-away venv, as OCRmyPDF's own watcher runs it (the plugin caches its RapidOCR engine).

Both sides' text layers are extracted with pypdfium2 and scored with the tests' CER (edit distance
over non-space characters, the pages of a file joined, against `truth.json`).

OCRmyPDF 17.13 refuses to start without `tesseract` >= 4.1.1 on PATH, even when the plugin does the
OCR (its built-in Tesseract plugin checks for the program unconditionally). `--stub-tesseract` puts
a stub first on PATH for OCRmyPDF only: it answers `--version` and refuses anything else, and each
call is logged, so the table can show that Tesseract never ran. Without the flag (and without a
real Tesseract) the script reports why OCRmyPDF cannot run and measures watcherd alone.
`--output-type pdf` (watcherd's `pdfa: false`) keeps OCRmyPDF from wanting Ghostscript for PDF/A;
image inputs go through img2pdf, so Ghostscript is not needed for them either.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

from harness import REPO, SAMPLES, BenchDaemon, iso, machine, table, wait_for

sys.path.insert(0, str(REPO))
from tests.conftest import edit_distance, without_spaces  # noqa: E402  (the tests' CER, exactly)

NAMES = ["memo_en.png", "receipt_zh.jpg", "two_pages.tif"]
LANGUAGE = "chi_tra"  # the plugin takes one language; all map to the same PP-OCRv6 model here
OPTIONS = ["--plugin", "ocrmypdf_rapidocr", "-l", LANGUAGE, "--output-type", "pdf", "--image-dpi", "300"]

STUB = """#!/bin/sh
echo "$*" >> {log}
if [ "$1" = "--version" ]; then echo "tesseract 5.3.0"; exit 0; fi
echo "tesseract stub: refusing '$*' (this benchmark must not run Tesseract)" >&2
exit 1
"""

WARM_DRIVER = """
import sys, time, ocrmypdf
for line in sys.stdin:
    src, dst = line.rstrip("\\n").split("\\t")
    started = time.perf_counter()
    try:
        ocrmypdf.ocr(src, dst, plugins=["ocrmypdf_rapidocr"], language=[%r], output_type="pdf",
                     image_dpi=300, progress_bar=False)
        print("ok", time.perf_counter() - started, flush=True)
    except Exception as error:
        print("error", type(error).__name__, str(error).replace("\\n", " "), flush=True)
"""


def cer_counts(got: str, want: str, nfkc: bool = False) -> tuple[int, int]:
    """Edit distance over non-space characters (as tests/test_outputs.py's cer) and the truth's length;
    `nfkc`: both sides NFKC-normalised first (OCRmyPDF's hOCR parser turns a full-width colon into `:`)."""
    if nfkc:
        got, want = unicodedata.normalize("NFKC", got), unicodedata.normalize("NFKC", want)
    a, b = without_spaces(got), without_spaces(want)
    return edit_distance(a, b), len(b)


def pdf_text(path: Path) -> str:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(path))
    try:
        return "\n".join(page.get_textpage().get_text_range() for page in document)
    finally:
        document.close()


class Ocrmypdf:
    """OCRmyPDF from its own venv, with (optionally) the Tesseract stub first on PATH."""

    def __init__(self, program: Path, stub: bool, work: Path):
        self.program = program
        self.python = program.parent / "python"
        self.env = dict(os.environ)
        self.stub_log = work / "tesseract-calls.log"
        if stub:
            bin_dir = work / "stub-bin"
            bin_dir.mkdir()
            (bin_dir / "tesseract").write_text(STUB.format(log=self.stub_log))
            (bin_dir / "tesseract").chmod(0o755)
            self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env['PATH']}"
        self.warm: subprocess.Popen[str] | None = None

    def why_not(self, probe_in: Path, probe_out: Path) -> str | None:
        """None when OCRmyPDF runs here; else what it said."""
        if not self.program.exists():
            return f"{self.program} does not exist (make the throw-away venv first, see the docstring)"
        done = subprocess.run(
            [str(self.program), *OPTIONS, str(probe_in), str(probe_out)], env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = " ".join(done.stderr.split()[-60:])
            return f"`ocrmypdf {' '.join(OPTIONS)}` exited {done.returncode}: {tail}"
        return None

    def cli(self, src: Path, dst: Path) -> float:
        started = time.perf_counter()
        subprocess.run(
            [str(self.program), "-q", *OPTIONS, str(src), str(dst)], env=self.env, check=True, capture_output=True
        )
        return time.perf_counter() - started

    def api(self, src: Path, dst: Path) -> float:
        if self.warm is None:
            self.warm = subprocess.Popen(
                [str(self.python), "-c", WARM_DRIVER % LANGUAGE],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        assert self.warm.stdin and self.warm.stdout
        self.warm.stdin.write(f"{src}\t{dst}\n")
        self.warm.stdin.flush()
        status, *rest = self.warm.stdout.readline().split(" ", 1)
        if status != "ok":
            raise RuntimeError(f"ocrmypdf.ocr failed on {src.name}: {rest}")
        return float(rest[0])

    def close(self) -> None:
        if self.warm and self.warm.stdin:
            self.warm.stdin.close()
            self.warm.wait(timeout=60)

    def tesseract_calls(self) -> list[str]:
        return self.stub_log.read_text().splitlines() if self.stub_log.exists() else []


def through_daemon(daemon: BenchDaemon, staging: Path, src: Path, name: str) -> tuple[float, dict[str, Any]]:
    shutil.copy(src, staging / name)
    started = time.perf_counter()
    os.rename(staging / name, daemon.inbox / name)
    result = daemon.outbox / f"{name}.json"
    wait_for(result.exists, 600, f"result for {name}")
    wall = time.perf_counter() - started
    document = json.loads(result.read_bytes())
    assert document["status"] == "ok", document
    return wall, document


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ocrmypdf", type=Path, default=Path("/tmp/ocrmypdf-venv/bin/ocrmypdf"))
    parser.add_argument("--stub-tesseract", action="store_true", help="see the docstring")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    truth = json.loads((SAMPLES / "truth.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="watcherd-vs-ocrmypdf-"))
    tools = ["watcherd", "ocrmypdf CLI", "ocrmypdf API, warm"]
    walls: dict[tuple[str, str], list[float]] = {(t, n): [] for t in tools for n in NAMES}
    texts: dict[tuple[str, str], str] = {}
    claim_to_json: dict[str, list[float]] = {n: [] for n in NAMES}
    engine_s: dict[str, list[float]] = {n: [] for n in NAMES}

    omp = Ocrmypdf(args.ocrmypdf.absolute(), args.stub_tesseract, work)
    why_not = omp.why_not(SAMPLES / "memo_en.png", work / "probe.pdf")
    if why_not:
        print(f"OCRmyPDF cannot run here, so only watcherd is measured: {why_not}\n")
        tools = ["watcherd"]

    daemon = BenchDaemon(ocr={"engine": "rapidocr"}, output={"formats": ["json", "pdf"]}).start()
    staging = Path(daemon.tmp.name) / "staging"
    staging.mkdir()
    try:
        through_daemon(daemon, staging, SAMPLES / "memo_en.png", "warmup.png")  # the child loads its engine
        if "ocrmypdf API, warm" in tools:
            omp.api(SAMPLES / "memo_en.png", work / "warmup.pdf")  # the plugin loads its engine
        for r in range(args.repeat):
            for name in NAMES:
                src = SAMPLES / name
                wall, document = through_daemon(daemon, staging, src, f"{r}-{name}")
                walls["watcherd", name].append(wall)
                claim_to_json[name].append(iso(document["finished_at"]) - iso(document["received_at"]))
                engine_s[name].append(sum(p["processing_time"] for p in document["pages"]))
                texts["watcherd", name] = pdf_text(Path(document["pdf_path"]))
                if "ocrmypdf CLI" in tools:
                    out = work / f"{r}-{name}.cli.pdf"
                    walls["ocrmypdf CLI", name].append(omp.cli(src, out))
                    texts["ocrmypdf CLI", name] = pdf_text(out)
                    out = work / f"{r}-{name}.api.pdf"
                    walls["ocrmypdf API, warm", name].append(omp.api(src, out))
                    texts["ocrmypdf API, warm", name] = pdf_text(out)
    finally:
        daemon.stop()
        omp.close()

    pages = {name: len(truth[name]) for name in NAMES}
    header = [
        "tool",
        "pages/min",
        *(f"s/page {n}" for n in NAMES),
        *(f"CER {n}" for n in NAMES),
        "CER all",
        "CER all, NFKC",
    ]
    rows = []
    for tool in tools:
        medians = {n: statistics.median(walls[tool, n]) for n in NAMES}
        per_min = 60 * sum(pages.values()) / sum(medians.values())
        edits = {n: cer_counts(texts[tool, n], "\n".join(truth[n])) for n in NAMES}
        total = sum(e for e, _ in edits.values()) / sum(c for _, c in edits.values())
        folded = [cer_counts(texts[tool, n], "\n".join(truth[n]), nfkc=True) for n in NAMES]
        total_nfkc = sum(e for e, _ in folded) / sum(c for _, c in folded)
        rows.append(
            [
                tool,
                f"{per_min:.1f}",
                *(f"{medians[n] / pages[n]:.2f}" for n in NAMES),
                *(f"{e / c:.3f}" for e, c in edits.values()),
                f"{total:.3f}",
                f"{total_nfkc:.3f}",
            ]
        )
    print(table(f"Searchable PDF, median of {args.repeat} (wall time a file, per page)", header, rows))
    print()
    inside = [
        [
            n,
            pages[n],
            f"{statistics.median(walls['watcherd', n]) / pages[n]:.2f}",
            f"{statistics.median(claim_to_json[n]) / pages[n]:.2f}",
            f"{statistics.median(engine_s[n]) / pages[n]:.2f}",
        ]
        for n in NAMES
    ]
    print(
        table(
            "watcherd's wall time, split (s/page, medians)",
            ["sample", "pages", "drop → JSON", "claim → JSON", "in engine.ocr()"],
            inside,
        )
    )
    print()
    if "ocrmypdf CLI" in tools:
        calls = omp.tesseract_calls()
        others = [c for c in calls if c != "--version"]
        print(f"Tesseract stub calls: {len(calls)} (other than --version: {len(others)} {others or ''})")
    for tool in tools:
        for n in NAMES:
            print(f"text {tool} {n}: {json.dumps(' '.join(texts[tool, n].split()), ensure_ascii=False)}")
    print(f"\n{machine()}, load average {os.getloadavg()[0]:.1f} at the end")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
