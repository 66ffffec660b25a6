"""The dispatcher's ready queue (relay/ready.py): each destination's deliveries in their order,
taken one destination after another."""

from __future__ import annotations

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
