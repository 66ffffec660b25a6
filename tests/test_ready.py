"""The dispatcher's ready queue (relay/ready.py): each destination's deliveries in their order,
taken one destination after another."""

from __future__ import annotations

from collections import deque

import pytest

from relay.ready import ReadyQueue
from relay.spool import Due


def due(seq: int, destination: str, body: str = "{}") -> Due:
    return Due(seq, f"dlv_{seq}", destination, 0, 0, None, 0.0, seq, body)


def test_destinations_take_turns_and_each_keeps_its_order() -> None:
    """A destination with a long line gives one delivery, then the next destination with
    work gives one: a backlog read first does not go first as a whole."""
    queue = ReadyQueue()
    queue.extend([due(1, "a"), due(2, "a"), due(3, "a"), due(4, "b"), due(5, "c")])
    queue.append(due(6, "b"))
    assert len(queue) == 6 and queue.has("b") and not queue.has("d")
    taken = [queue.popleft().seq for _ in range(6)]
    assert taken == [1, 4, 5, 2, 6, 3]
    assert not queue and queue.size == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_deliveries_put_back_keep_their_place_and_go_first() -> None:
    """Deliveries passed over (a busy host) go back to the head of their lines, in their
    order, and their destinations take the next turns in the order they had."""
    queue = ReadyQueue()
    queue.extend([due(1, "a"), due(2, "b"), due(3, "a"), due(4, "c"), due(5, "b")])
    passed = [queue.popleft(), queue.popleft()]          # a's 1, b's 2
    queue.extendleft(reversed(passed))
    assert [d.seq for d in queue] == [1, 3, 2, 5, 4]     # a's line, b's, c's
    assert [queue.popleft().seq for _ in range(5)] == [1, 2, 4, 3, 5]


def test_size_counts_the_event_json_held() -> None:
    queue = ReadyQueue()
    queue.extend([due(1, "a", "x" * 10), due(2, "b", "y" * 5)])
    assert queue.size == 15
    first = queue.popleft()
    assert queue.size == 5
    queue.extendleft([first])
    assert queue.size == 15
    queue.clear()
    assert queue.size == 0 and len(queue) == 0


def test_a_line_taken_whole_comes_back_in_order_behind_rows_put_back_meanwhile() -> None:
    """take_line / put_lines: a busy destination's line set aside at once and put back at the
    head of the turns; a delivery of it put back one by one in the same round (older) stays
    in front. Counts and sizes follow."""
    queue = ReadyQueue()
    queue.extend([due(1, "a", "xx"), due(2, "b"), due(3, "a", "yyy"), due(4, "a"),
                  due(5, "c")])
    first = queue.popleft()                              # a's 1, held (put back one by one)
    b = queue.popleft()                                  # b's 2: its host is busy
    line, size = queue.take_line("b")
    line.appendleft(b)
    rest, rest_size = queue.take_line("a")               # a's 3 and 4, passed over whole
    assert [d.seq for d in rest] == [3, 4] and rest_size == 5
    assert len(queue) == 1 and queue.size == 2           # only c's 5 is left in turn
    queue.extendleft([first])
    queue.put_lines({"b": (line, size + 2), "a": (rest, rest_size)})
    assert len(queue) == 5 and queue.size == 2 + 2 + 3 + 2 + 2
    assert [queue.popleft().seq for _ in range(5)] == [2, 1, 5, 3, 4]
    assert queue.size == 0 and queue.take_line("z") == (deque(), 0)


def test_trim_drops_the_newest_of_the_longest_lines() -> None:
    queue = ReadyQueue()
    queue.extend([due(n, "a", "x" * n) for n in range(1, 101)])
    queue.extend([due(n, "b") for n in range(101, 104)])
    queue.trim(20)
    assert len(queue) == 20 and queue.has("b")
    kept = [queue.popleft() for _ in range(20)]
    assert [d.seq for d in kept if d.destination == "b"] == [101, 102, 103]
    assert [d.seq for d in kept if d.destination == "a"] == list(range(1, 18))
    assert queue.size == 0 and not queue
