"""The parent's side of the OCR child without a child: exit reasons, requests on the wire, page records."""

from __future__ import annotations

import json
import signal

import pytest

from watcherd.ocr import protocol
from watcherd.ocr.process import Exit, ExitReason


@pytest.mark.parametrize(
    ("reason", "sentence", "label"),
    [
        (ExitReason.of_status(-signal.SIGSEGV), "killed by SIGSEGV", "sigsegv"),
        (ExitReason.of_status(-signal.SIGKILL), "killed by SIGKILL (perhaps out of memory?)", "sigkill"),
        (ExitReason.of_status(-99), "killed by signal 99", "signal"),
        (ExitReason.of_status(3), "exited with status 3", "exit"),
        (ExitReason.of_status(0), "exited with status 0", "exit"),
        (ExitReason.of_status(None), "unknown exit status", "exit"),
        (ExitReason(Exit.TIMEOUT, "in/a b.pdf"), "killed by watcherd (page timeout on in/a b.pdf)", "timeout"),
        (ExitReason(Exit.RECYCLED), "killed by watcherd (recycling)", "recycled"),
        (ExitReason(Exit.STOPPED, "stopping"), "killed by watcherd (stopping)", "stopped"),
        (
            ExitReason(Exit.STOPPED, "stopping after the 10 s grace"),
            "killed by watcherd (stopping after the 10 s grace)",
            "stopped",
        ),
        (ExitReason(Exit.LOAD_FAILED), "killed by watcherd (engine load failed)", "load_failed"),
        (
            ExitReason(Exit.KILLED, "broke the protocol: not JSON"),
            "killed by watcherd (broke the protocol: not JSON)",
            "killed",
        ),
    ],
)
def test_an_exit_reason_gives_the_log_its_sentence_and_the_metric_its_label(
    reason: ExitReason, sentence: str, label: str
) -> None:
    assert (str(reason), reason.label) == (sentence, label)


def test_requests_are_written_as_the_child_reads_them() -> None:
    earlier = [{"page": 1, "text": "x", "processing_time": 0.5, "size": [10, 20], "resized_from": None}]
    render = {"formats": {"pdf": "/state/tmp/a.pdf"}}
    request = protocol.OcrRequest(
        (
            protocol.FileRequest(7, "/in/a\udce9.pdf", render, 16, earlier),
            protocol.FileRequest(8, "/in/b.png", {}),
        ),
        solo=True,
        turn_pages=16,
    )
    wire = protocol.encode(request)
    written_before = json.dumps(  # the wire format the child has always read
        {
            "op": "ocr",
            "files": [
                {"id": 7, "path": "/in/a\udce9.pdf", "render": render, "first_page": 16, "earlier": earlier},
                {"id": 8, "path": "/in/b.png", "render": {}, "first_page": 0, "earlier": []},
            ],
            "solo": True,
            "turn_pages": 16,
        },
        ensure_ascii=True,
    ).encode()
    assert wire == written_before
    assert protocol.decode_request(wire) == request
    for other, raw in ((protocol.IdleRequest(), b'{"op": "idle"}'), (protocol.ExitRequest(), b'{"op": "exit"}')):
        assert protocol.encode(other) == raw and protocol.decode_request(raw) == other
    with pytest.raises(protocol.ProtocolError, match="unknown request"):
        protocol.decode_request(b'{"op": "launch"}')


def test_a_page_message_becomes_the_page_of_the_result_json_once() -> None:
    line = {"text": "Hi", "score": 1, "box": [[0, 0], [4, 0], [4, 2], [0, 2]], "extra": "dropped"}
    raw = {
        "op": "page",
        "id": 3,
        "page": 2,
        "text": "Hi \udce9",
        "processing_time": 1,
        "size": [40, 20],
        "resized_from": [80, 40],
        "source": "pdf_text",
        "rotated": 90,
        "batch_pages": 4,
        "batch_time": 2.5,
        "lines": [line],
    }
    page = protocol.decode(json.dumps(raw).encode())
    assert isinstance(page, protocol.Page) and page.id == 3 and page.page == 2
    assert list(page.record.items()) == [
        ("page", 2),
        ("text", "Hi \ufffd"),
        ("processing_time", 1.0),
        ("size", [40, 20]),
        ("resized_from", [80, 40]),
        ("source", "pdf_text"),
        ("rotated", 90),
        ("batch_pages", 4),
        ("batch_time", 2.5),
        ("replaced_characters", 1),
        ("lines", [{"text": "Hi", "score": 1, "box": [[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0]]}]),
    ]
    plain = protocol.decode(b'{"op": "page", "id": 1, "page": 1, "text": "a", "processing_time": 0.2, "size": []}')
    assert isinstance(plain, protocol.Page) and plain.record == {
        "page": 1,
        "text": "a",
        "processing_time": 0.2,
        "size": [],
        "resized_from": None,
        "source": "ocr",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b'{"op": "ready", "pid": 1, "load_time": 1%s, "engine": null}',
        b'{"op": "page", "id": 1, "page": 1, "text": "a", "processing_time": 1%s, "size": []}',
        b'{"op": "page", "id": 1, "page": 1, "text": "a", "processing_time": 0, "size": [], "batch_pages": 2,'
        b' "batch_time": 1%s}',
        b'{"op": "page", "id": 1, "page": 1, "text": "a", "processing_time": 0, "size": [],'
        b' "lines": [{"text": "a", "score": null, "box": [[1%s, 0], [1, 0], [1, 1], [0, 1]]}]}',
    ],
)
def test_a_number_too_large_for_a_float_is_a_protocol_error(raw: bytes) -> None:
    """Not an OverflowError in the parent's loop: the child is not trusted (design §9)."""
    with pytest.raises(protocol.ProtocolError, match="too large"):
        protocol.decode(raw % (b"0" * 400))
