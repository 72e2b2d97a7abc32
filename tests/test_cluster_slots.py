"""The dispatcher's remote slots without a broker: replies are routed by attempt id, stale and
malformed ones cost nothing but their own file. (tests/test_cluster.py runs the real thing.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("celery")

from watcherd.cluster import wire  # noqa: E402
from watcherd.cluster.dispatcher import RemoteSlot, make_slots  # noqa: E402
from watcherd.core import config_file
from watcherd.core.records import Job  # noqa: E402
from watcherd.ocr.supervisor import State  # noqa: E402


@pytest.fixture
def slots(tmp_path: Path) -> list[RemoteSlot]:
    settings = config_file.from_dict(
        {
            "paths": {"inbox": str(tmp_path / "inbox"), "state": str(tmp_path / "state")},
            "cluster": {
                "role": "dispatcher",
                "broker_url": "amqp://u:p@127.0.0.1:1//",  # never connected: the link is not started
                "max_in_flight": 2,
                "path_map": {str(tmp_path): "/mnt/shared"},
            },
        }
    )
    made = make_slots(settings, wake=lambda: None)
    for slot in made:
        slot.state = State.IDLE  # as once the link has reached the broker
    return made


def job(tmp_path: Path, name: str) -> Job:
    path = tmp_path / name
    path.write_bytes(b"x" * 10)
    return Job(rel=name, path=path, received_at="2026-11-29T10:00:00+00:00", identity=(1, path.stat().st_ino))


def reply(slot: RemoteSlot, kind: str, **fields: object) -> None:
    slot.hub.link.incoming.append(
        ("reply", {"attempt": slot.attempt, "job": "?", "host": "gpu1", "kind": kind, **fields})
    )


def test_a_task_carries_the_mapped_path_signature_and_a_fresh_attempt(slots, tmp_path: Path) -> None:
    slot = slots[0]
    j = job(tmp_path, "a.png")
    assert slot.assign(j) and slot.state == State.BUSY and j.attempts == 1
    (task,) = slot.hub.link.outgoing
    assert task["path"] == "/mnt/shared/a.png" and task["attempt"] == slot.attempt
    st = j.path.stat()
    assert task["signature"] == [st.st_size, st.st_mtime_ns, st.st_ino]


def test_replies_go_to_their_attempt_and_stale_ones_are_dropped(slots, tmp_path: Path) -> None:
    first, second = slots
    first.assign(job(tmp_path, "a.png"))
    second.assign(job(tmp_path, "b.png"))
    stale = {"attempt": "not-ours", "job": "a.png", "host": "gpu9", "kind": "outcome", "outcome": {"ok": True}}
    first.hub.link.incoming.append(("reply", stale))
    reply(second, "started", device=0, engine="echo")
    reply(second, "progress", page=2, pages=3)
    reply(second, "outcome", outcome={"ok": True, "pages": [{"page": 1, "text": "b"}], "opened_ino": 77})
    assert first.pump() == [] and first.state == State.BUSY  # the stale outcome did not finish a.png
    (outcome,) = second.pump()
    assert outcome.ok and outcome.job.rel == "b.png" and outcome.pages == [{"page": 1, "text": "b"}]
    assert outcome.job.opened == (1, 77)  # the service's tamper check compares inodes
    assert second.state == State.IDLE and first.hub.dropped == 1
    assert first.hub.status()["workers"][0]["host"] == "gpu1"


def test_a_malformed_outcome_fails_its_file_only(slots, tmp_path: Path) -> None:
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    reply(slot, "outcome", outcome={"ok": True, "pages": [{"page": 1, "text": 5}], "processing_time": "soon"})
    (outcome,) = slot.pump()
    assert not outcome.ok and outcome.code == "engine_error"


@pytest.mark.parametrize("code", ["no_such_code", None, 7])
def test_a_failure_without_a_known_error_code_is_an_engine_error(slots, tmp_path: Path, code: object) -> None:
    """The error document explains its code: one it cannot explain must not reach it."""
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    reply(slot, "outcome", outcome={"ok": False, "code": code, "detail": None})
    (outcome,) = slot.pump()
    assert not outcome.ok and outcome.code == "engine_error" and outcome.detail


def test_a_known_failure_without_detail_still_says_something(slots, tmp_path: Path) -> None:
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    reply(slot, "outcome", outcome={"ok": False, "code": "unreadable", "detail": None})
    (outcome,) = slot.pump()
    assert outcome.code == "unreadable" and outcome.detail == "the worker gave no detail"


def test_a_dead_lettered_file_is_child_crashed_naming_the_hosts(slots, tmp_path: Path) -> None:
    slot = slots[0]
    slot.assign(job(tmp_path, "poison.png"))
    for host in ("gpu1", "gpu2"):
        slot.hub.link.incoming.append(("reply", {"attempt": slot.attempt, "host": host, "kind": "started"}))
    slot.hub.link.incoming.append(("dead", {"attempt": slot.attempt, "job": "poison.png"}))
    (outcome,) = slot.pump()
    assert outcome.code == "child_crashed" and "gpu1, gpu2" in (outcome.detail or "")


def test_a_deferral_is_not_an_attempt(slots, tmp_path: Path) -> None:
    slot = slots[0]
    j = job(tmp_path, "big.png")
    slot.assign(j)
    reply(slot, "outcome", outcome={"ok": False, "deferred": True, "gpu_info_after": {"available": True, "free_mb": 9}})
    (outcome,) = slot.pump()
    assert outcome.deferred and j.attempts == 0 and slot.files_done == 0 and slot.ready


@pytest.mark.parametrize(
    "body",
    [
        ["not", "a", "mapping"],
        {"kind": "progress", "host": "gpu1"},  # no attempt id
        {"kind": "reboot", "attempt": "x"},
        {"kind": "progress", "attempt": "x", "page": "two"},
        {"kind": "progress", "attempt": "x", "page": True},
        {"kind": "outcome", "attempt": "x", "outcome": "done"},
    ],
)
def test_a_message_no_worker_writes_is_dropped_and_the_loop_goes_on(slots, tmp_path: Path, body: object) -> None:
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    if isinstance(body, dict) and body.get("attempt") == "x":
        body["attempt"] = slot.attempt  # even from the attempt's holder
    slot.hub.link.incoming.append(("reply", body))
    reply(slot, "outcome", outcome={"ok": True, "pages": [{"page": 1, "text": "a"}]})
    (outcome,) = slot.pump()
    assert outcome.ok and slot.hub.refused == 1 and slot.hub.dropped == 0


def test_a_task_is_read_back_as_it_was_written_and_a_foreign_one_is_refused(slots, tmp_path: Path) -> None:
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    (sent,) = slot.hub.link.outgoing
    assert wire.Task.decode(sent).encode() == sent
    for bad in ({**sent, "path": 7}, {**sent, "signature": [1, 2]}, {k: v for k, v in sent.items() if k != "reply_to"}):
        with pytest.raises(wire.WireError):
            wire.Task.decode(bad)


def test_only_a_reply_of_an_attempt_in_flight_names_a_host(slots, tmp_path: Path) -> None:
    """Forged replies (no valid attempt) used to add a worker each: status and metrics grew
    without bound. A real one names its host, with a bounded device name."""
    slot = slots[0]
    slot.assign(job(tmp_path, "a.png"))
    for i in range(300):
        slot.hub.link.incoming.append(("reply", {"attempt": f"forged{i}", "host": f"fake{i}", "kind": "started"}))
    reply(slot, "started", device="x" * 10_000)
    slot.pump()
    assert set(slot.hub.hosts) == {"gpu1"} and slot.hub.hosts["gpu1"].device is None
    assert slot.hub.dropped == 300


def test_the_host_table_keeps_its_size_when_hosts_come_and_go(slots, tmp_path: Path) -> None:
    from watcherd.cluster.dispatcher import MAX_HOSTS

    slot = slots[0]
    for i in range(MAX_HOSTS + 20):
        slot.assign(job(tmp_path, f"f{i}.png"))
        reply(slot, "started", host=f"h{i}")
        reply(slot, "outcome", outcome={"ok": True, "pages": [{"page": 1, "text": "x"}]})
        slot.pump()
    assert len(slot.hub.hosts) == MAX_HOSTS and f"h{MAX_HOSTS + 19}" in slot.hub.hosts
