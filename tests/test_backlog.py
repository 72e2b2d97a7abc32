"""The backlog's orders and invariants, on a fake clock: no sleeping."""

from __future__ import annotations

from pathlib import Path

from watcherd.core.records import Job
from watcherd.work.backlog import Backlog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(name: str) -> Job:
    return Job(rel=name, path=Path("/work/processing") / name, received_at="t")


SIG = (0o100000, 1, 1)


def test_claimed_files_go_before_ready_ones_and_put_back_goes_first() -> None:
    backlog = Backlog(clock=Clock())
    backlog.add_ready(Path("/in/r.png"), SIG)
    backlog.add_claimed([job("a"), job("b")])
    backlog.put_back(job("retry"))
    assert [backlog.next_claimed().rel for _ in range(3)] == ["retry", "a", "b"]  # type: ignore[union-attr]
    assert backlog.next_claimed() is None
    assert backlog.next_ready() == (Path("/in/r.png"), SIG)
    assert backlog.next_ready() is None and backlog.empty


def test_a_path_is_queued_once_however_often_it_is_reported() -> None:
    backlog = Backlog(clock=Clock())
    for _ in range(3):
        backlog.add_ready(Path("/in/x.png"), SIG)
    assert Path("/in/x.png") in backlog and backlog.counts()["ready"] == 1
    backlog.next_ready()
    assert Path("/in/x.png") not in backlog
    backlog.add_ready(Path("/in/x.png"), SIG)  # seen again after it left: queued again
    assert backlog.counts()["ready"] == 1


def test_deferred_files_wait_for_their_time_and_others_pass_them() -> None:
    clock = Clock()
    backlog = Backlog(clock=clock)
    backlog.defer(job("big"), 30.0)
    backlog.defer(job("bigger"), 10.0)
    assert backlog.next_claimed() is None and backlog.next_retry_at() == 110.0
    assert backlog.empty  # nothing to do now: the children may clear their caches
    backlog.add_claimed([job("small")])
    assert backlog.next_claimed().rel == "small"  # type: ignore[union-attr]
    clock.now = 110.0
    assert backlog.next_claimed().rel == "bigger"  # type: ignore[union-attr]
    assert backlog.next_claimed() is None
    clock.now = 130.0
    assert backlog.next_claimed().rel == "big"  # type: ignore[union-attr]
    assert backlog.counts() == {"ready": 0, "claimed": 0, "waiting_for_memory": 0}


def test_blocked_names_go_back_to_the_front_when_a_file_finishes() -> None:
    backlog = Backlog(clock=Clock())
    backlog.add_ready(Path("/in/later.png"), SIG)
    backlog.block(Path("/in/a.png"), SIG)
    backlog.block(Path("/in/b.png"), SIG)
    backlog.unblock()
    backlog.unblock()  # nothing left to unblock: no duplicates
    assert [backlog.next_ready()[0].name for _ in range(3)] == ["a.png", "b.png", "later.png"]  # type: ignore[index]


def test_waiting_jobs_hands_over_every_claimed_file_once() -> None:
    backlog = Backlog(clock=Clock())
    backlog.add_claimed([job("a")])
    backlog.defer(job("d"), 5.0)
    assert [j.rel for j in backlog.waiting_jobs()] == ["a", "d"]
    assert backlog.waiting_jobs() == [] and backlog.empty and backlog.next_retry_at() is None


def test_a_part_way_file_takes_every_other_turn() -> None:
    """ocr.turn_pages: a long file between turns is owed the next turn once another file went,
    and takes any turn nobody else wants; it is counted as claimed and put back at a stop."""
    backlog = Backlog(clock=Clock())
    long = job("long.pdf")
    backlog.take_turn(long)
    assert backlog.next_turn() is None  # nobody went since its last turn: not owed yet
    assert not backlog.empty and backlog.counts()["claimed"] == 1
    backlog.another_went()
    assert backlog.next_turn() is long
    assert backlog.next_turn(anyway=True) is None
    backlog.take_turn(long)
    assert backlog.next_turn(anyway=True) is long  # nothing else waiting
    backlog.take_turn(long)
    assert backlog.waiting_jobs() == [long] and backlog.empty
