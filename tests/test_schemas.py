"""The JSON Schemas in docs/schemas/ are the contract of the documents watcherd publishes
(docs/json.md, "JSON Schemas"): valid draft 2020-12 schemas, in step with the code and with the
reference tables, met by real documents (from `watcherd ocr` with the real rapidocr, and from one
daemon run, as written and as the webhook posts them), and strict enough to refuse a document
that is not one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.conftest import REPO, SAMPLES, make_image, run_watcherd, wait_until
from tests.test_docs import documented_keys
from tests.test_handoff import Receiver
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import RENDERED, Settings
from watcherd.ocr.protocol import ERROR_CODES, ROTATIONS
from watcherd.outputs.documents import document_for

SCHEMAS = REPO / "docs" / "schemas"
SCHEMA_FOR = {"ok": "result", "failed": "error", "duplicate": "duplicate"}  # status → docs/schemas/<name>.schema.json
HEADING_OF = {"result": "Result document", "error": "Error document", "duplicate": "Duplicate document"}
Document = dict[str, Any]


def schema(name: str) -> Document:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())  # type: ignore[no-any-return]


def problems(document: Document) -> list[str]:
    """What the schema for the document's status finds wrong with it (none: it validates)."""
    checker = Draft202012Validator(
        schema(SCHEMA_FOR[document["status"]]), format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in checker.iter_errors(document)]


# -- the schemas themselves -----------------------------------------------------------------


def test_each_schema_is_a_valid_2020_12_schema() -> None:
    assert sorted(p.name for p in SCHEMAS.iterdir()) == sorted(f"{n}.schema.json" for n in SCHEMA_FOR.values())
    for name in SCHEMA_FOR.values():
        document = schema(name)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(document)
        assert document["additionalProperties"] is False, name


def test_the_schemas_say_what_the_code_and_the_reference_say() -> None:
    """Required keys are json.md's "always", properties are every key it lists; the enums are the
    code's own (error codes, rotations, page sources, rendered formats); the definitions the
    files share are the same in each."""
    for name, heading in HEADING_OF.items():
        always, sometimes = documented_keys(heading)
        document = schema(name)
        assert set(document["required"]) == always, name
        assert set(document["properties"]) == always | sometimes, name
    result, error = schema("result"), schema("error")
    page = result["$defs"]["page"]
    always, sometimes = documented_keys("Page fields")
    assert (set(page["required"]), set(page["properties"])) == (always, always | sometimes)
    assert error["properties"]["error_code"]["enum"] == list(ERROR_CODES)
    assert page["properties"]["rotated"]["enum"] == list(ROTATIONS)
    assert page["properties"]["source"]["enum"] == ["ocr", "pdf_text"]
    assert result["properties"]["output_errors"]["propertyNames"]["enum"] == list(RENDERED)
    for status in ("ok", "failed", "duplicate"):
        assert schema(SCHEMA_FOR[status])["properties"]["status"] == {"const": status}
    defs = [schema(name)["$defs"] for name in SCHEMA_FOR.values()]
    for key in {k for d in defs for k in d}:
        assert len({json.dumps(d[key], sort_keys=True) for d in defs if key in d}) == 1, f"$defs/{key} differs"


# -- real documents -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def from_the_cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Document]:
    """`watcherd ocr` with rapidocr over a scan, a two-page TIFF, a born-digital PDF, a truncated
    JPEG, a text file and a symbolic link: their documents, by file name."""
    from fpdf import FPDF

    folder = tmp_path_factory.mktemp("cli")
    for name in ("memo_en.png", "two_pages.tif"):
        shutil.copy(SAMPLES / name, folder / name)
    (folder / "truncated.jpg").write_bytes((SAMPLES / "receipt_zh.jpg").read_bytes()[:3000])
    (folder / "note.txt").write_text("not a scan\n")
    (folder / "link.png").symlink_to(folder / "memo_en.png")
    pdf = FPDF()
    for text in ("Invoice 2026-0042", "Total due: 900 TWD"):
        pdf.add_page()
        pdf.set_font("helvetica", size=16)
        pdf.cell(text=text)
    pdf.output(str(folder / "digital.pdf"))
    config = folder / "watcherd.yaml"
    config.write_text("ocr: {engine: rapidocr, timeout_s: 120}\noutput: {locale: en}\n")
    names = ["memo_en.png", "two_pages.tif", "digital.pdf", "truncated.jpg", "note.txt", "link.png"]
    done = run_watcherd("ocr", *(str(folder / n) for n in names), "--config", str(config), timeout=240)
    documents = json.loads(done.stdout)
    assert len(documents) == len(names), done.stderr
    return dict(zip(names, documents, strict=True))


def test_documents_from_watcherd_ocr_validate(from_the_cli: dict[str, Document]) -> None:
    docs = from_the_cli
    memo, tiff, pdf = docs["memo_en.png"], docs["two_pages.tif"], docs["digital.pdf"]
    assert [d["status"] for d in (memo, tiff, pdf)] == ["ok"] * 3, (memo, tiff, pdf)
    assert all(line["words"] for line in memo["pages"][0]["lines"]), "rapidocr gives words"
    assert [p["page"] for p in tiff["pages"]] == [1, 2]
    assert [p["source"] for p in pdf["pages"]] == ["pdf_text", "pdf_text"]
    codes = [docs[n]["error_code"] for n in ("truncated.jpg", "note.txt", "link.png")]
    assert codes == ["unreadable", "unsupported_type", "not_regular_file"]
    assert {name: problems(d) for name, d in docs.items()} == {name: [] for name in docs}


def test_documents_from_a_daemon_validate_as_written_and_as_posted(daemon_factory: Any, tmp_path: Path) -> None:
    """Every output format (so every `*_path`), dedupe: skip (a duplicate), a truncated file (an
    error) and a name that is not UTF-8 (`source_b64`); the webhook posts the same documents."""
    receiver = Receiver()
    try:
        daemon = daemon_factory(
            ocr={"engine": "tests.engines:Lines"},
            output={"formats": ["json", "md", "txt", *RENDERED]},
            dedupe={"mode": "skip"},
            webhook={"url": receiver.url},
        ).start()
        scan = make_image(tmp_path / "scan.png", 60, 40)
        shutil.copy(scan, daemon.inbox / "a.png")
        result = daemon.wait_json("a.png", daemon.outbox)
        shutil.copy(scan, daemon.inbox / "b.png")
        duplicate = daemon.wait_json("b.png", daemon.outbox)
        (daemon.inbox / "truncated.jpg").write_bytes((SAMPLES / "receipt_zh.jpg").read_bytes()[:3000])
        error = daemon.wait_json("truncated.jpg", daemon.failed)
        make_image(Path(os.fsdecode(os.fsencode(daemon.inbox) + b"/caf\xe9.png")), 61, 40)
        latin1 = Path(os.fsdecode(os.fsencode(daemon.outbox) + b"/caf\xe9.png.json"))
        wait_until(latin1.exists, 30, "the non-UTF-8 name's JSON")
        named = json.loads(latin1.read_bytes())
        wait_until(lambda: len(receiver.delivered()) == 4, 30, "four webhook deliveries")
        posted = [json.loads(p["body"]) for posts in receiver.delivered().values() for p in posts]
    finally:
        receiver.close()
    assert (result["status"], duplicate["status"], error["status"]) == ("ok", "duplicate", "failed")
    assert {"text_path", "txt_path", "pdf_path", "hocr_path", "alto_path"} <= result.keys(), result
    assert result["pages"][0]["lines"][0]["words"] and "source_b64" in named
    written = {d["source"]: d for d in (result, duplicate, error, named)}
    assert {d["source"]: d for d in posted} == written
    assert {d["source"]: problems(d) for d in written.values()} == {source: [] for source in written}


# -- the schemas can fail -------------------------------------------------------------------


def _page(document: Document) -> Document:
    return document["pages"][0]  # type: ignore[no-any-return]


MUTATIONS: dict[str, tuple[str, Callable[[Document], Any]]] = {
    "an unknown top-level key": ("memo_en.png", lambda d: d.update(confidence=0.9)),
    "a wrong type": ("memo_en.png", lambda d: d.update(attempts="1")),
    "a required key missing": ("memo_en.png", lambda d: d.pop("sha256")),
    "a result without pages": ("memo_en.png", lambda d: d.update(pages=[])),
    "a malformed hash": ("memo_en.png", lambda d: d.update(sha256="0" * 63)),
    "a timestamp without its offset": ("memo_en.png", lambda d: d.update(finished_at="2026-01-01T00:00:00.000")),
    "an unknown page key": ("memo_en.png", lambda d: _page(d).update(language="en")),
    "a page without its size": ("memo_en.png", lambda d: _page(d).pop("size")),
    "a rotation that is not a right angle": ("memo_en.png", lambda d: _page(d).update(rotated=45)),
    "an unknown page source": ("memo_en.png", lambda d: _page(d).update(source="guess")),
    "a batch size without its time": ("memo_en.png", lambda d: _page(d).update(batch_pages=2)),
    "an unknown line key": ("memo_en.png", lambda d: _page(d)["lines"][0].update(angle=0)),
    "a box of three points": ("memo_en.png", lambda d: _page(d)["lines"][0]["box"].pop()),
    "a score over 1": ("memo_en.png", lambda d: _page(d)["lines"][0]["words"][0].update(score=1.5)),
    "an unknown rendered format": ("memo_en.png", lambda d: d.update(output_errors={"docx": "no"})),
    "an unknown error code": ("truncated.jpg", lambda d: d.update(error_code="exploded")),
    "an error with pages": ("truncated.jpg", lambda d: d.update(pages=[])),
    "an error without its detail": ("truncated.jpg", lambda d: d.pop("detail")),
    "an error read as a result": ("truncated.jpg", lambda d: d.update(status="ok")),
    "a GPU said available without figures": ("truncated.jpg", lambda d: d.update(gpu_info={"available": True})),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_document_that_is_not_one_fails(from_the_cli: dict[str, Document], mutation: str) -> None:
    name, mutate = MUTATIONS[mutation]
    document = copy.deepcopy(from_the_cli[name])
    assert problems(document) == []
    mutate(document)
    assert problems(document), f"{mutation}: validates"


def test_a_duplicate_that_is_not_one_fails() -> None:
    """From `document_for` itself: the daemon test above validates one as published."""
    job = Job(rel="copy.png", path=Path("/srv/ocr/inbox/copy.png"), received_at="2026-01-01T00:00:00.000+00:00")
    outcome = Outcome(job=job, ok=True, sha256="0" * 64, duplicate_of="/srv/ocr/outbox/first.png.json")
    duplicate, _ = document_for(outcome, settings=Settings(), received_at=job.received_at)
    assert problems(duplicate) == []
    for key, value in (("attempts", 1), ("text", ""), ("source_b64", "not base64!"), ("duplicate_of", None)):
        assert problems({**duplicate, key: value}), key
    assert problems({k: v for k, v in duplicate.items() if k != "duplicate_of"})
