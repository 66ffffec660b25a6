"""What the relay and its spool writer say to each other: the jobs, their errors, the framing.

Both sides import these definitions, so a job's fields are written down once. Frames are a
4-byte little-endian length and a ``marshal`` payload. A request is ``(job_id, op, args)`` with
``args`` one of the job NamedTuples below sent as a plain tuple (marshal refuses tuple
subclasses: ``message`` sends ``tuple(job)``, ``parse`` rebuilds it with ``_make``). An answer is
``(job_id, error, result)`` where ``error`` is None or ``JobError.wire()``. A frame holds one
request or answer, or a list of them: the relay sends what it queued in one loop turn, and
the writer a group's answers to each client, in frames of up to FRAME_JOBS (``frame_many``;
``split_jobs`` reads both forms). Frame 0 from the writer says it is ready (its pid) or why it
cannot open the spool.

Stdlib only, and no I/O: the writer process imports this at start-up, which must stay fast.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

_HEADER = struct.Struct("<I")

Answer = tuple[int, "tuple[str, str, int] | None", Any]   # (job_id, error, result)
WAKE = -1   # the job id of a frame the writer sends unasked: another worker stored new work
MIGRATING = -2  # ... and of the one it sends before migrating the spool's schema, which can
                # take longer than the start timeout: (from version, to version)


class JobError(Exception):
    """A job's failure as the relay should see it: ``kind`` is "full" (answer 503 with
    Retry-After) or "error"."""

    def __init__(self, kind: str, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after

    def wire(self) -> tuple[str, str, int]:
        return (self.kind, self.message, self.retry_after)


# -- the jobs --------------------------------------------------------------------------------

class IngestEvent(NamedTuple):
    """One accepted event of an ingest job, with the deliveries to create for it."""

    id: str
    sender_id: int                # 1: ``id`` is the sender's idempotency key
    received_at: float
    body: str                     # the normalised event JSON
    routes: list[tuple[str, str, str | None]]   # (destination, state, reason) per delivery


# An IngestEvent as the relay builds it: a plain tuple of the same fields, because building the
# NamedTuple and converting it cost ~1 us per event on the event loop's core (the writer unpacks
# the tuple as it is). The assignment below makes mypy check that both agree.
IngestEventTuple = tuple[str, int, float, str, list[tuple[str, str, str | None]]]
if TYPE_CHECKING:
    _same_fields: IngestEventTuple = IngestEvent("", 0, 0.0, "", [])


class IngestJob(NamedTuple):
    """Store a request's events, all or nothing; answers the Receipt's fields."""

    now: float
    since: float                  # the dedupe window starts here
    events: list[IngestEventTuple]


class RecordJob(NamedTuple):
    """One attempt's outcome and the delivery's new state."""

    now: float
    seq: int                      # the delivery
    event_seq: int
    n: int                        # the attempt's number, from 1
    at: float
    duration: float | None
    status_code: int | None
    error: str | None
    excerpt: str | None
    state: str                    # pending | delivered | failed
    not_before: float
    failures: int
    reason: str | None


class ReplayJob(NamedTuple):
    """Failed deliveries back to pending; answers the delivery ids replayed."""

    now: float
    delivery_ids: list[str]
    destination: str | None
    failed_since: float | None


class AddHeldJob(NamedTuple):
    """Credit host suspension time to deliveries already retrying; answers the rows changed."""

    destinations: list[str]
    seconds: float


class PruneJob(NamedTuple):
    """Delete finished events received before ``cutoff``; answers how many."""

    cutoff: float


class PageLimitJob(NamedTuple):
    """Cap the file's growth (None: lift the cap); answers its page count."""

    pages: int | None


class StatsJob(NamedTuple):
    """The writer's counts."""


class StopJob(NamedTuple):
    """Answer, then exit once this group is done."""


Job = (IngestJob | RecordJob | ReplayJob | AddHeldJob | PruneJob | PageLimitJob | StatsJob
       | StopJob)

JOBS: dict[str, type[Job]] = {
    "ingest": IngestJob, "record": RecordJob, "replay": ReplayJob, "add_held": AddHeldJob,
    "prune": PruneJob, "page_limit": PageLimitJob, "stats": StatsJob, "stop": StopJob}
_OP: dict[type, str] = {cls: op for op, cls in JOBS.items()}


def op_name(job: Job) -> str:
    """The name ``job`` travels under ("record", "ingest", ...)."""
    return _OP[type(job)]


def message(job_id: int, job: Job) -> tuple[int, str, tuple[Any, ...]]:
    """The request asking the writer to run ``job``, as it travels (in a frame of its own or
    in a list)."""
    return (job_id, _OP[type(job)], tuple(job))


def request(job_id: int, job: Job) -> bytes:
    """The frame asking the writer to run ``job`` alone."""
    return frame(message(job_id, job))


def parse(op: str, args: Any) -> Job:
    """A request's job, rebuilt; a JobError naming what is wrong with it otherwise."""
    cls = JOBS.get(op)
    if cls is None:
        raise JobError("error", f"unknown spool job {op!r}")
    try:
        return cls._make(args)
    except TypeError as exc:
        raise JobError("error", f"malformed spool {op} job: {exc}") from exc


# -- framing ---------------------------------------------------------------------------------

def frame(message: Any) -> bytes:
    payload = marshal.dumps(message)
    return _HEADER.pack(len(payload)) + payload


FRAME_JOBS = 64  # requests or answers in one frame at most: a frame is read and unmarshalled
                 # whole, so this bounds what the writer holds at once (a group still takes
                 # frames up to writer.MAX_GROUP jobs)
_MAX_FRAME = (1 << 32) - 1  # bytes a frame's 4-byte length can say


def frame_many(messages: list[Any], refused: Callable[[Any, ValueError], Any]) -> bytes:
    """``messages`` in frames of FRAME_JOBS, each frame a list: one marshal call per frame,
    where a frame each cost 0.84 us per outcome on the event loop and 0.37 to read its answer
    (0.29 and 0.05 in a list of 50). If marshal refuses one of them, or a frame would pass
    4 GiB, each is framed alone and one that cannot travel is replaced by
    ``refused(message, error)`` (or left out if that gives None): one bad message never costs
    the others."""
    out = []
    for start in range(0, len(messages), FRAME_JOBS):
        chunk = messages[start:start + FRAME_JOBS]
        try:
            out.append(_frame_list(chunk))
        except ValueError:
            for one in chunk:
                try:
                    out.append(_frame_list([one]))
                except ValueError as exc:
                    one = refused(one, exc)
                    if one is not None:
                        out.append(_frame_list([one]))
    return b"".join(out)


def _frame_list(messages: list[Any]) -> bytes:
    payload = marshal.dumps(messages)
    if len(payload) > _MAX_FRAME:
        raise ValueError(f"{len(payload)} bytes are more than one frame holds")
    return _HEADER.pack(len(payload)) + payload


def jobs_of(message: Any) -> list[Any]:
    """The requests or answers a frame holds: a list of them, or one."""
    return message if type(message) is list else [message]


def split_jobs(buffer: bytearray, limit: int = 1 << 30) -> list[Any]:
    """``split_frames``'s frames as the requests or answers they hold, in order."""
    return [one for message in split_frames(buffer, limit) for one in jobs_of(message)]


def split_frames(buffer: bytearray, limit: int = 1 << 30) -> list[Any]:
    """Complete frames at the start of ``buffer`` (removed from it): at least one if there is
    one, then more while they hold fewer than ``limit`` requests or answers in all (a list
    counts its length)."""
    messages: list[Any] = []
    offset = taken = 0
    while taken < limit and len(buffer) - offset >= 4:
        (size,) = _HEADER.unpack_from(buffer, offset)
        if len(buffer) - offset - 4 < size:
            break
        one = marshal.loads(buffer[offset + 4:offset + 4 + size])
        messages.append(one)
        taken += len(one) if type(one) is list else 1
        offset += 4 + size
    del buffer[:offset]
    return messages
