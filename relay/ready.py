"""The dispatcher's ready queue: due deliveries fetched (or offered) and not started yet.

Each destination's deliveries wait in their own line, oldest first; ``popleft`` takes the head
of each line in turn. So a destination with a large backlog in memory (a look's whole share of
it) never stands in front of another destination's deliveries when a request slot comes free:
the next one goes to the next destination with work, however old the backlog is. Within a
destination the order is the spool's (due time, then seq): its retries and its first attempts
keep their order.

It offers what the dispatcher used of a ``deque`` (append, extend, popleft, extendleft, clear,
len, iteration), so the dispatcher reads as before. Plain data, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from relay.spool import Due


class ReadyQueue:
    """Due deliveries by destination, taken one destination after another."""

    __slots__ = ("_count", "_lines", "_sizes", "size")

    def __init__(self) -> None:
        # destination -> its deliveries, oldest first; the dict's order is the turn order (the
        # destination whose delivery was just taken goes to the back)
        self._lines: dict[str, deque[Due]] = {}
        self._sizes: dict[str, int] = {}  # destination -> characters of event JSON in its line
        self._count = 0
        self.size = 0   # characters of event JSON held (memory is bounded in bytes too)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Due]:
        for line in self._lines.values():
            yield from line

    def has(self, destination: str) -> bool:
        """Whether any of ``destination``'s deliveries wait here."""
        return destination in self._lines

    def append(self, due: Due) -> None:
        line = self._lines.get(due.destination)
        if line is None:
            line = self._lines[due.destination] = deque()
        line.append(due)
        self._count += 1
        size = len(due.event_json)
        self.size += size
        self._sizes[due.destination] = self._sizes.get(due.destination, 0) + size

    def extend(self, dues: Iterable[Due]) -> None:
        for due in dues:
            self.append(due)

    def popleft(self) -> Due:
        """The oldest delivery of the destination whose turn it is (IndexError when empty)."""
        if not self._count:
            raise IndexError("pop from an empty ready queue")
        name, line = next(iter(self._lines.items()))
        due = line.popleft()
        self._count -= 1
        size = len(due.event_json)
        self.size -= size
        del self._lines[name]
        if line:
            self._lines[name] = line   # its next delivery waits for the others' turn
            self._sizes[name] -= size
        else:
            del self._sizes[name]
        return due

    def take_line(self, destination: str) -> tuple[deque[Due], int]:
        """Remove ``destination``'s line and return it (oldest first) with its characters of
        event JSON, to be put back with ``put_lines``: a destination none of whose deliveries
        can start now (its host is busy) is passed over at once, not one delivery at a time
        (a line can be thousands long). O(1)."""
        line = self._lines.pop(destination, None)
        if line is None:
            return deque(), 0
        size = self._sizes.pop(destination)
        self._count -= len(line)
        self.size -= size
        return line, size

    def put_lines(self, lines: dict[str, tuple[deque[Due], int]]) -> None:
        """Lines taken with ``take_line``, back at the head of the turn order, in the order
        given; behind any deliveries their destination has here again meanwhile (put back
        with ``extendleft``: taken before them in the same round, so older)."""
        front: dict[str, deque[Due]] = {}
        for name, (line, size) in lines.items():
            if not line:
                continue
            self._count += len(line)
            self.size += size
            self._sizes[name] = self._sizes.get(name, 0) + size
            here = self._lines.pop(name, None)
            if here is not None:
                here.extend(line)   # (rare: one row of the round was held for another reason)
                line = here
            front[name] = line
        if front:
            self._lines = {**front, **self._lines}

    def trim(self, limit: int) -> None:
        """Keep at most about ``limit`` deliveries: the newest of the longest lines go (each
        line keeps at least its share, and one delivery). They stay due in the spool, where a
        look finds them."""
        if self._count <= limit:
            return
        share = max(1, limit // len(self._lines))
        for name, line in self._lines.items():
            dropped = 0
            while len(line) > share and self._count > limit:
                dropped += len(line.pop().event_json)
                self._count -= 1
            self._sizes[name] -= dropped
            self.size -= dropped

    def extendleft(self, dues: Iterable[Due]) -> None:
        """Put deliveries back at the head of their destinations' lines, as
        ``deque.extendleft`` does (give them in reverse to keep their order); their
        destinations take the first turns, in the order they had: they were passed over, not
        served."""
        back: dict[str, deque[Due]] = {}
        for due in dues:
            line = back.get(due.destination)
            if line is None:
                line = back[due.destination] = self._lines.pop(due.destination, deque())
            line.appendleft(due)
            self._count += 1
            size = len(due.event_json)
            self.size += size
            self._sizes[due.destination] = self._sizes.get(due.destination, 0) + size
        if back:
            self._lines = {**dict(reversed(back.items())), **self._lines}

    def clear(self) -> None:
        self._lines.clear()
        self._sizes.clear()
        self._count = 0
        self.size = 0
