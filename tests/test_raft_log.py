"""RaftLog: the entries after a snapshot and their index arithmetic (sllmd/raft/log.py)."""

from __future__ import annotations

import pytest

from sllmd.raft.log import RaftLog
from sllmd.raft.messages import Entry, EntryKind, Snapshot


def run(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(i, term, data=f"e{i}".encode()) for i in range(first, last + 1)]


def config(index: int, term: int, *voters: str) -> Entry:
    return Entry(index, term, EntryKind.CONFIG, voters=tuple(voters))


def indices(entries: tuple[Entry, ...]) -> list[int]:
    return [e.index for e in entries]


@pytest.fixture
def log() -> RaftLog:
    """Snapshot at 10 (term 2), then entries 11..15 of term 3 and 16..18 of term 4."""
    return RaftLog(Snapshot(10, 2, ("a", "b", "c")), [*run(11, 15, 3), *run(16, 18, 4)])


def test_empty_log() -> None:
    log = RaftLog()
    assert log.snapshot == Snapshot(0, 0, ())
    assert (log.first_index, log.last_index, log.last_term) == (1, 0, 0)
    assert log.term_at(0) == 0
    assert log.term_at(1) is None and log.term_at(-1) is None
    assert log.entries(0, 100) == ()
    assert log.config_at(5) == ((), 0)


def test_indices_follow_the_snapshot(log: RaftLog) -> None:
    assert (log.first_index, log.last_index, log.last_term) == (11, 18, 4)
    assert indices(log.entries(log.first_index, log.last_index)) == list(range(11, 19))


def test_construction_skips_entries_folded_into_the_snapshot() -> None:
    log = RaftLog(Snapshot(5, 1, ("a",)), run(3, 8, 1))  # storage one compaction behind
    assert (log.first_index, log.last_index) == (6, 8)
    assert indices(log.entries(0, 100)) == [6, 7, 8]


def test_construction_refuses_a_gap() -> None:
    with pytest.raises(ValueError, match="gap: expected index 7, found 8"):
        RaftLog(Snapshot(5, 1, ("a",)), [*run(6, 6, 1), *run(8, 9, 1)])
    with pytest.raises(ValueError, match="gap: expected index 1, found 2"):
        RaftLog(None, run(2, 3, 1))


def test_append() -> None:
    log = RaftLog()
    log.append(run(1, 3, 1))
    log.append([])
    log.append(run(4, 4, 2))
    assert (log.last_index, log.last_term) == (4, 2)
    assert indices(log.entries(1, 4)) == [1, 2, 3, 4]


@pytest.mark.parametrize("entries", [run(5, 5, 1), run(3, 3, 1), [*run(4, 4, 1), *run(6, 6, 1)]],
                         ids=["past-the-end", "overlapping", "gap-inside"])
def test_append_refuses_entries_that_do_not_follow(entries: list[Entry]) -> None:
    log = RaftLog(None, run(1, 3, 1))
    with pytest.raises(ValueError, match="cannot append"):
        log.append(entries)
    assert log.last_index == 3  # nothing appended


def test_term_at_around_the_snapshot_boundary(log: RaftLog) -> None:
    assert log.term_at(9) is None  # compacted away
    assert log.term_at(10) == 2  # the snapshot's own index answers with its term
    assert log.term_at(11) == 3
    assert log.term_at(15) == 3
    assert log.term_at(16) == 4
    assert log.term_at(18) == 4
    assert log.term_at(19) is None  # beyond the log


def test_last_term_falls_back_to_the_snapshot() -> None:
    log = RaftLog(Snapshot(7, 5, ("a",)))
    assert (log.first_index, log.last_index, log.last_term) == (8, 7, 5)
    assert log.term_at(7) == 5 and log.term_at(8) is None


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (11, 18, list(range(11, 19))),
    (13, 15, [13, 14, 15]),
    (14, 14, [14]),
    (0, 12, [11, 12]),  # clamped below to first_index
    (10, 10, []),  # the snapshot's index is not an entry
    (17, 100, [17, 18]),  # clamped above to last_index
    (19, 25, []),
    (3, 7, []),  # wholly compacted
    (15, 14, []),  # empty range
    (-5, -1, []),
])
def test_entries_slicing_clamps(log: RaftLog, lo: int, hi: int, expected: list[int]) -> None:
    assert indices(log.entries(lo, hi)) == expected


def test_truncate(log: RaftLog) -> None:
    log.truncate(16)
    assert (log.last_index, log.last_term) == (15, 3)
    assert log.term_at(16) is None
    log.truncate(30)  # past the end: nothing to drop
    assert log.last_index == 15
    log.truncate(11)  # everything after the snapshot
    assert (log.first_index, log.last_index, log.last_term) == (11, 10, 2)
    assert log.entries(0, 100) == ()
    log.append(run(11, 11, 5))  # the log continues after the snapshot
    assert (log.last_index, log.last_term) == (11, 5)


@pytest.mark.parametrize("index", [10, 3])
def test_truncate_never_reaches_into_the_snapshot(log: RaftLog, index: int) -> None:
    with pytest.raises(ValueError, match="cannot truncate"):
        log.truncate(index)
    assert log.last_index == 18


def test_compact(log: RaftLog) -> None:
    snapshot = log.compact(13, b"state@13")
    assert snapshot == Snapshot(13, 3, ("a", "b", "c"), b"state@13")
    assert log.snapshot is snapshot
    assert (log.first_index, log.last_index, log.last_term) == (14, 18, 4)
    assert log.term_at(12) is None and log.term_at(13) == 3 and log.term_at(14) == 3
    assert indices(log.entries(0, 100)) == [14, 15, 16, 17, 18]


def test_compact_everything_keeps_the_last_term(log: RaftLog) -> None:
    log.compact(18, b"")
    assert (log.first_index, log.last_index, log.last_term) == (19, 18, 4)
    assert log.entries(0, 100) == ()


@pytest.mark.parametrize("index", [10, 9, 19])
def test_compact_refuses_an_index_outside_the_entries(log: RaftLog, index: int) -> None:
    before = log.snapshot
    with pytest.raises(ValueError, match="cannot compact"):
        log.compact(index, b"")
    assert log.snapshot is before and log.last_index == 18


def test_compact_takes_the_voters_in_force_at_its_index() -> None:
    log = RaftLog(Snapshot(0, 0, ("a",)), [*run(1, 2, 1), config(3, 1, "a", "b"), *run(4, 5, 1),
                                           config(6, 2, "a", "b", "c"), *run(7, 7, 2)])
    assert log.compact(2, b"").voters == ("a",)  # before any config entry: the snapshot's voters
    assert log.compact(5, b"").voters == ("a", "b")
    assert log.compact(7, b"").voters == ("a", "b", "c")


def test_config_at() -> None:
    log = RaftLog(Snapshot(2, 1, ("a",)), [*run(3, 3, 1), config(4, 1, "a", "b"), *run(5, 6, 1),
                                           config(7, 2, "a", "b", "c"), *run(8, 8, 2)])
    assert log.config_at(3) == (("a",), 2)  # the snapshot set it
    assert log.config_at(4) == (("a", "b"), 4)
    assert log.config_at(6) == (("a", "b"), 4)
    assert log.config_at(7) == (("a", "b", "c"), 7)
    assert log.config_at(100) == (("a", "b", "c"), 7)  # clamped to last_index
    log.truncate(7)  # an uncommitted config entry dropped: the earlier one rules again
    assert log.config_at(log.last_index) == (("a", "b"), 4)
    log.compact(5, b"")  # the config entry folded into the snapshot
    assert log.config_at(log.last_index) == (("a", "b"), 5)


def test_install_snapshot_replaces_everything(log: RaftLog) -> None:
    incoming = Snapshot(40, 7, ("x", "y"), b"state@40")
    log.install_snapshot(incoming)
    assert log.snapshot is incoming
    assert (log.first_index, log.last_index, log.last_term) == (41, 40, 7)
    assert log.term_at(18) is None and log.term_at(40) == 7
    assert log.entries(0, 100) == ()
    assert log.config_at(40) == (("x", "y"), 40)
    log.append(run(41, 42, 7))
    assert indices(log.entries(0, 100)) == [41, 42]


def test_install_snapshot_behind_the_log_discards_the_entries_too(log: RaftLog) -> None:
    log.install_snapshot(Snapshot(12, 3, ("a",)))
    assert (log.first_index, log.last_index, log.last_term) == (13, 12, 3)
    assert log.entries(0, 100) == ()
