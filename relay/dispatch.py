"""The dispatcher: takes due deliveries from the spool, sends them, writes the outcome back.

One pipeline per delivery, each step its own function: load event -> render (payloads) ->
sign (auth) -> send (transport) -> classify and decide (policy) -> record (spool). Nothing sleeps waiting to
retry: a retry is a new ``not_before`` in the spool, and the loop wakes on new work, on a
finished request, or when the next delivery falls due. Requests in flight are bounded
globally (``delivery.concurrency``) and per host (``delivery.per_host_concurrency``); a host at
its limit is passed over, so it never holds up deliveries to other hosts. A request's slots are
free once its response is in, while its outcome is committed (RECORDING_MAX such at most).

A delivery is marked done only after its outcome is committed. A crash in between means the
attempt is made again: at-least-once, with the same ``Webhook-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cachetools

from relay.config import Config
from relay.destinations import CompiledDestination, compile_destinations
from relay.errors import RenderError, SpoolError
from relay.events import Event, load_event
from relay.frozen import frozen
from relay.health import HELD_STATUS, HealthBoard, Host, counts_as_failure
from relay.logs import Throttle
from relay.metrics import Metrics
from relay.policy import Outcome, Verdict, classify, decide
from relay.ratelimit import RateLimits, replica_share
from relay.ready import ReadyQueue
from relay.request import Request, endpoint
from relay.sending import send
from relay.spool import Attempt, Due, Receipt
from relay.spool.contract import WorkQueue
from relay.spool.records import DUE_BUDGET
from relay.supervise import Supervisor
from relay.transport import AiohttpTransport, Transport

log = logging.getLogger("relay.dispatch")

PREFETCH = 256       # due deliveries read from the spool at a time
# SQLite: offered deliveries waiting in memory for a request slot (a burst faster than its
# receivers, delivered from memory, not read back from the spool: bench/e2e.py). PostgreSQL
# keeps two looks' worth (its offers are leased rows: see offer_mark).
READY_ROWS = 16_384
READY_BYTES = 8 << 20        # ... and characters of their event JSON
IDLE_RECHECK = 60.0  # wake at least this often, e.g. after a replay made by another process
# Memory is bounded in bytes of stored event JSON (a parsed event weighs several times its
# text): 100 events of 1 MiB pending or in flight stay under 200 MB resident (bench/abuse.py).
EVENT_CACHE_BYTES = 2 << 20  # parsed events kept for their other destinations
EVENT_CACHE_EVENTS = 256     # ... and at most this many: an event's deliveries start together
                             # (the collector walks every one kept: 2 MiB of small events cost
                             # 6k instructions per delivery, bench/dispatch.py under callgrind)
INFLIGHT_BYTES = 4 << 20     # events of the attempts under way (one attempt at least)
# Deliveries answered whose outcome is not committed yet (SQLite outcomes wait up to 2 ms to
# share a commit), beyond delivery.concurrency: they hold no request slot, so a slow commit
# costs no sending, up to this many.
RECORDING_MAX = 256
STARVED_TRIES = 16  # deliveries of one destination a round tries against the byte budget
ASIDE_EVERY = 0.05  # seconds between two looks aside at least (other workers wake per group)
LEASE_SLACK = 0.5  # seconds of a claim kept beyond an attempt's timeout (rendering, clocks)
LOOK_HISTORY = 16            # looks whose claims are kept to sort out PostgreSQL offers
PARKED_MAX = 10_000          # deliveries remembered as held for a suspended chosen endpoint
RECORD_RETRY_MAX = 30.0      # longest wait between tries to record a kept outcome
READ_RETRY = 1.0             # seconds between tries to read due deliveries in an outage


@frozen
class _Prepared:
    """A delivery's request, rendered and signed, or the attempt that failed to make it."""

    request: Request | None
    started: float
    host: str                       # its health key: scheme://host:port
    outcome: Outcome | None = None  # when there is no request
    attempt: Attempt | None = None


@dataclass(frozen=True, slots=True)
class _Meters:
    """A destination's labelled metric children, looked up once per config, not per attempt."""

    latency: Any
    counted: dict[str, Any]   # verdict state -> relay_deliveries_total child

    @classmethod
    def of(cls, metrics: Metrics, name: str) -> _Meters:
        return cls(metrics.attempt_seconds.labels(name),
                   {state: metrics.deliveries.labels(name, outcome)
                    for state, outcome in (("delivered", "delivered"), ("pending", "retried"),
                                           ("failed", "failed"))})


class Dispatcher:
    """Delivers due deliveries from the spool until stopped."""

    def __init__(self, config: Config, spool: WorkQueue, *,
                 destinations: dict[str, CompiledDestination] | None = None,
                 transport: Transport | None = None,
                 metrics: Metrics | None = None,
                 supervisor: Supervisor | None = None,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 health: Callable[..., HealthBoard] = HealthBoard) -> None:
        self.spool = spool
        self.clock = clock
        self.rand = rand
        self.metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(self.metrics.count_restart)
        self.transport: Transport = transport or AiohttpTransport(config, clock)
        # A board of this process's own (SQLite) or shared by replicas (relay/health_shared.py).
        self.health = health(config.health, on_change=self._host_changed)
        self.limits = RateLimits()
        self._limited: set[str] = set()  # destinations held back by their rate limit this round
        self._limited_seqs: cachetools.LRUCache[int, bool] = cachetools.LRUCache(1 << 16)
        # Deliveries held for a suspended event-chosen endpoint (seq -> endpoint): left out of
        # the next fetches while it is suspended, so a backlog aimed at one dead endpoint
        # never fills the batch in front of other endpoints' and destinations' deliveries.
        self._parked: cachetools.LRUCache[int, str] = cachetools.LRUCache(PARKED_MAX)
        self._host_destinations: dict[str, list[str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._inflight: dict[int, asyncio.Task[None]] = {}  # started, outcome not committed
        # of those, the requests not answered yet (delivery.concurrency): seq -> (host, probe?)
        self._requesting: dict[int, tuple[str, bool]] = {}
        self._starved = False    # a start waited for an outcome's commit (RECORDING_MAX, bytes)
        self._limit = config.delivery.concurrency   # the loop's, as it started
        self._recheck = False    # a delivery was passed over to let a fresh one probe: go again
        # fetched (or offered), due, not started yet: each destination's oldest first, taken
        # one destination after another (relay/ready.py)
        self._ready = ReadyQueue()
        self._aside = config.spool.backend == "sqlite"   # see _look_aside
        # how much the ready queue takes from offers (_offerable); SQLite also keeps the
        # deliveries of a busy host's destinations there (_start_some) and takes their offers
        self._ready_rows, self._ready_bytes = (READY_ROWS, READY_BYTES) if self._aside else \
            (2 * PREFETCH, DUE_BUDGET)
        # PostgreSQL: how long a claim is this replica's, and when each row in the ready queue
        # was claimed (by a look, or leased at ingest): one whose lease would end before its
        # attempt could is not started (see _start_some)
        self._lease: float | None = getattr(spool, "lease", None)
        self._read_failed = Throttle(10.0)
        self._claimed_at: dict[int, float] = {}
        self._host_load: Counter[str] = Counter()
        self._inflight_bytes = 0
        self._wake = asyncio.Event()
        # What the last look at the spool established, kept until something changes it (see
        # _forget): the destinations it saw every due delivery of (``_covered``: those it
        # asked for, if nothing was left out), and when the next one falls due (``_next_at``).
        # While both hold, deliveries offered by this process's ingest for those destinations
        # are started from memory and no read is needed at all; a destination held back (a
        # suspended or busy host, a rate limit) is looked for once it opens again.
        self._covered: frozenset[str] = frozenset()
        self._changes = 0  # _forget calls: one during a look makes what it saw incomplete
        self._next_at: float | None = None
        # destination -> the earliest due time of its retries recorded since (the next look
        # may be a while: the ready queue may hold a busy host's deliveries)
        self._retry_due: dict[str, float] = {}
        # ... and, for destinations a look aside read since (_look_aside), the highest seq
        # that one could see
        self._seen_for: dict[str, int] = {}
        # Destinations whose new events could not start from memory since the last look at
        # them: the only ones a look aside reads (not every uncovered one: after each forget,
        # a retry's or the backstop's, that read every idle destination round after round)
        self._wanted: set[str] = set()
        self._aside_at = 0.0   # when the last look aside began
        self._seen_upto = 0     # the highest delivery seq the last look could see: offers at
                                # or below it are that look's to hand out
        self._looked_at = 0.0   # when the last look was made (IDLE_RECHECK applies under load)
        self._open: frozenset[str] = frozenset()  # destinations taking deliveries, last round
        # ... and those whose offers join the ready queue: open, or (SQLite) waiting only for
        # a request slot at their host
        self._accepting: frozenset[str] = frozenset()
        self._looking = False   # a look at the spool is under way
        self._looks = 0         # looks begun (PostgreSQL offers: see offer_mark)
        # (look number, seqs it claimed or gave back) of the last LOOK_HISTORY looks:
        # PostgreSQL rows offered by an ingest that such a look overlapped may be among them
        self._claimed: deque[tuple[int, frozenset[int]]] = deque(maxlen=LOOK_HISTORY)
        self._held_offers: list[Receipt] = []   # offers made during it, for after it
        self._held_bytes = 0    # their events' stored JSON
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # An event goes to several destinations: parse its stored JSON once, not per delivery.
        # The budget is in bytes (each entry weighs its stored JSON), not entries: 4,096 events
        # of 1 MiB each once held gigabytes. The oldest entry goes first (see _event).
        self._events: OrderedDict[int, tuple[Event, int]] = OrderedDict()
        self._event_bytes = 0
        # Outcome first: attempts that were made but whose outcome the spool could not take
        # (disk full, spool restarting). They are kept here and recorded as soon as it can;
        # meanwhile no new attempt starts, and these deliveries are not sent again.
        self._unrecorded: dict[int, tuple[Due, Attempt, Verdict]] = {}
        self.record_error: str | None = None
        self.reconfigure(config, destinations)

    def reconfigure(self, config: Config,
                    destinations: dict[str, CompiledDestination] | None = None) -> None:
        """Use a (re)loaded config for every attempt started from now on.

        Attempts in flight finish with the route they started with. Deliveries of removed
        destinations stay pending in the spool (and go out again if the name comes back);
        host health is kept. Connection limits, the CA bundle and delivery.allowed_networks
        apply after a restart (relay/reload.py says so when they change).
        ``destinations`` are the config's compiled destinations (compiled here if not given).
        """
        if destinations is None:
            destinations = compile_destinations(config, clock=self.clock,
                                                on_mint=self.metrics.mint_counter)
        self.config = config
        self.destinations = destinations
        if len(destinations) <= 1:  # nothing is cached with one destination (see _event)
            self._events.clear()
            self._event_bytes = 0
        self._meters = {name: _Meters.of(self.metrics, name) for name in destinations}
        self.health.config = config.health
        self.limits.configure(config, replica_share() if config.spool.backend == "postgres" else 1)
        hosts: dict[str, list[str]] = {}
        for name, compiled in destinations.items():
            if compiled.host is not None:
                hosts.setdefault(compiled.host, []).append(name)
        self._host_destinations = hosts
        # Destinations whose host comes from event data: each rendered endpoint is its own
        # health key, so an event-chosen endpoint can only suspend itself.
        self._templated = [name for name, c in destinations.items() if c.host is None]
        self._templated_names = frozenset(self._templated)
        self._clear_ready()  # may hold deliveries of a removed destination
        self.wake()

    async def start(self) -> None:
        self._task = self.supervisor.spawn("dispatcher", self._run)

    def wake(self) -> None:
        """Something may have become due (a replay, another process's ingest, a reload): the
        next round looks at the spool."""
        self._forget()
        self._wake.set()

    def others_stored(self) -> None:
        """The spool holds work this process did not store (SQLite: another worker's events,
        or a group committed while the writer was out of reach): wake, and let a look aside
        read every open destination (which ones is not known), as for an offer of its own
        that could not start from memory; looks aside are spaced (ASIDE_EVERY). Deliveries
        waiting in memory stay: those events are newer than theirs."""
        self._wanted |= self._accepting
        self._forget(trim=False)
        self._wake.set()

    def offer_mark(self, wanted: Mapping[str, int]) -> tuple[int, dict[str, int]] | None:
        """PostgreSQL: asked as an ingest with ``wanted[d]`` pending deliveries for each
        destination d is queued. The answer says how many of them this replica would start at
        once: those are stored leased to it, so no other replica can claim them, and offered
        with the number (``receipt.mark``): the looks begun before, so the looks after it are
        those that may have claimed the same rows (this replica's own lease does not stop
        them; see offer). The rest are any replica's: all of them while this replica is
        stopping or paused; those of a destination its last look did not cover (or the look
        under way is not asking for) or whose host is held; and those beyond its free request
        slots (overall and at each host, less its ready queue; a host's shared by its
        destinations) or its rate limit's tokens, so a burst is shared among the replicas.
        (Ingests queued together each see the same free slots: they may lease a few more,
        which then wait here as a look's prefetch does.)"""
        free = self._limit - len(self._requesting) - len(self._ready)
        if self._stopping or self._unrecorded or free <= 0:
            return None
        looking = self._looking
        usable = self._open if looking else self._covered
        if not usable:
            return None
        per_host, now = self.config.delivery.per_host_concurrency, self.clock()
        # a host's free slots, less its ready deliveries and what this answer gives it so far
        host_free: dict[str, int] = {}
        load = self._host_load

        def room(host: str) -> int:
            return host_free.get(host, per_host - load[host])

        for due in self._ready:
            target = self.destinations.get(due.destination)
            if target is not None and target.host is not None:
                host_free[target.host] = room(target.host) - 1
        taken: dict[str, int] = {}
        for name, count in wanted.items():
            target = self.destinations.get(name)
            if name not in usable or target is None:
                continue
            n = self.limits.available(name, now, min(count, free))
            host = target.host
            if host is not None:
                if self.health.is_blocked(host, now):
                    continue
                n = min(n, room(host))
            if n <= 0:
                continue
            taken[name] = n
            free -= n
            if host is not None:
                host_free[host] = room(host) - n
            if free <= 0:
                break
        if not taken:
            return None
        return (self._looks - 1 if looking else self._looks), taken  # (the look under way
        #                                                              may claim them too)

    def offer(self, receipt: Receipt) -> None:
        """Deliveries this process's ingest has just committed (``receipt.fresh``; on
        PostgreSQL only those stored leased to this replica, see offer_mark; without them the
        offer is a wake-up): they join the ready queue from memory, so a stored event costs no
        read of the spool before its attempt. They are the spool's rows as it would hand them
        out, and the spool stays the authority. They
        are taken only for destinations taking work in the last round (open; on SQLite also
        those waiting only for a slot at a busy host) whose every due delivery the last look
        saw (so they overtake no older due work, such as a retry), while the ready queue has
        room (_offerable); those offered while a look reads wait for its answer (see _run);
        otherwise the offer is an ordinary wake-up and a look finds them, oldest first. One for
        a destination held back (a suspended host, a rate limit) wakes nothing: the
        destination is no longer covered, so a look finds its deliveries when it opens again.
        A row a look could already see is that look's to hand out, never queued twice (on
        PostgreSQL, see below)."""
        if self._looking and receipt.fresh:
            size = sum(map(len, receipt.bodies))
            if self._held_bytes + size <= INFLIGHT_BYTES:
                self._held_offers.append(receipt)  # the look under way decides (see _run)
                self._held_bytes += size
            else:
                self.wake()  # memory is bounded in bytes: the next look finds these
            return
        if not receipt.fresh or self._stopping or self._unrecorded or \
                (self._next_at is not None and self._next_at <= self.clock()):
            self.wake()     # (a retry just fell due: it goes first)
            return
        open_, covered, seen, seen_for = self._open, self._covered, self._seen_upto, \
            self._seen_for
        # No room for them in memory: a look finds them (only theirs is forgotten: the other
        # destinations' offers still start from memory)
        accepting = self._offerable(receipt)
        fresh = [entry for entry in receipt.fresh
                 if entry[2] > seen and (not seen_for or entry[2] > seen_for.get(entry[4], 0))]
        if receipt.mark is not None and receipt.mark != self._looks:
            # PostgreSQL: this replica's looks may claim the rows leased to it (and give back
            # those past their budget: anyone's then). What the looks begun since the ingest
            # was queued claimed or gave back is theirs to hand out, or the other replicas'.
            claimed = self._claimed_since(receipt.mark)
            if claimed is None:
                self.wake()  # too many looks since to tell: the next look hands them out
                return
            fresh = [entry for entry in fresh if entry[2] not in claimed]
        taken = [entry for entry in fresh if entry[4] in covered and entry[4] in accepting]
        # (PostgreSQL: deliveries stored for any replica, beside the offered ones, are this
        # replica's to look for too, as declined ones are)
        left = receipt.unoffered
        if len(taken) < len(fresh):
            left = left | ({entry[4] for entry in fresh} - {entry[4] for entry in taken})
        if left:
            self._covered = covered - left
            # Open, but not covered by the last look: look now. (One closed then wakes the
            # loop when it opens: a free slot, the end of a suspension, even one that ended
            # during a look, a probe given up, a token, a shared hold let go.) What the look
            # covered of the other destinations still holds: their offers still start from
            # memory (forgetting it all, one destination's steady ingest made every other's
            # events wait for a look).
            if not left.isdisjoint(open_):
                self._wake.set()
            # new events that wait for a read (see _run), also of a destination whose host is
            # busy now: when a slot comes free, a look aside reads them, not only a look once
            # the ready queue is used up
            self._wanted |= left & self._accepting
        if not taken:
            return
        dues = receipt._replace(fresh=taken).dues()
        self._ready.extend(dues)
        if self._lease is not None:   # (leased at ingest, a moment ago)
            at = self.clock()
            self._claimed_at.update((due.seq, at) for due in dues)
        self._wake.set()

    def _clear_ready(self) -> None:
        self._ready.clear()
        self._claimed_at.clear()

    def _offerable(self, receipt: Receipt) -> frozenset[str]:
        """The destinations whose offers in ``receipt`` the ready queue has room for. Its
        bound: READY_ROWS / READY_BYTES on SQLite, two looks' rows and one look's budget of
        event JSON on PostgreSQL (one look's rows alone made it full: a look that was all one
        destination's backlog then turned every other destination's offer into a wake-up,
        which forgot what the look had covered, and their new events waited for the
        backlog's rows). Destinations whose endpoint is chosen per event keep the smaller
        bound: a round renders each of their deliveries to learn its host."""
        accepting = self._accepting
        if not self._ready:
            return accepting
        rows = len(self._ready) + len(receipt.fresh)
        size = self._ready.size + sum(map(len, receipt.bodies))
        if rows > self._ready_rows or size > self._ready_bytes:
            return frozenset()
        if self._templated and (rows > 2 * PREFETCH or size > DUE_BUDGET):
            return accepting - self._templated_names
        return accepting

    def _claimed_since(self, mark: int) -> set[int] | None:
        """The seqs claimed or given back by the looks after look ``mark``; None if some
        are forgotten."""
        claims = [seqs for number, seqs in self._claimed if number > mark]
        if len(claims) < self._looks - mark:
            return None
        return set().union(*claims)

    def _retry_soon(self, destination: str, at: float | None) -> None:
        """A retry of ``destination`` was recorded, due at ``at``: the next look learns of it
        (what the last look covered is forgotten), and once it is due a look aside reads that
        destination if the ready queue holds others' deliveries (a full look waits for the
        queue to be used up). Nothing is trimmed before then: trimmed at each retry recorded,
        the rows a look had read were read again and again."""
        if at is not None and at > self.clock():
            known = self._retry_due.get(destination)
            self._retry_due[destination] = at if known is None else min(known, at)
            self._forget(trim=False)
        else:
            self._wanted.add(destination)
            self._forget()
        self._wake.set()

    def _forget(self, trim: bool = True) -> None:
        """The spool may hold due work this process has not seen: the next round looks.

        A full look waits until the ready queue is used up, and on SQLite that queue may
        hold thousands of deliveries waiting for a busy host: when it holds more than two
        looks' worth, what is beyond one round's worth (delivery.concurrency) goes, and stays
        due in the spool. So the work the spool may hold (a replay, a retry falling due, the
        end of another host's suspension) is read after a round, not after the whole backlog
        in memory; a queue of a look's rows is left alone (trimmed, they were read again and
        again)."""
        self._covered = frozenset()
        self._changes += 1
        if trim and self._aside and len(self._ready) > 2 * max(self._limit * 4, PREFETCH):
            self._ready.trim(self._limit)

    async def stop(self, timeout: float) -> None:
        """Stop taking work; let attempts in flight finish for up to ``timeout`` seconds."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        pending = list(self._inflight.values())
        if pending:
            log.info("waiting up to %.0fs for %d attempts in flight", timeout, len(pending))
            _, late = await asyncio.wait(pending, timeout=timeout)
            if late:
                log.warning("abandoning %d attempts still in flight after %.0fs: they stay "
                            "pending", len(late), timeout)
            for task in late:  # left pending in the spool: they are tried again after restart
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        close = getattr(self.transport, "close", None)
        if close is not None:
            await close()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def _run(self) -> None:
        self._limit = self.config.delivery.concurrency  # (restart to change)
        record_wait = 1.0
        self._forget()  # (re)started: nothing seen yet
        while not self._stopping:
            self._wake.clear()
            wait = IDLE_RECHECK
            if self._unrecorded:
                # Dispatching is paused until every kept outcome is written.
                if await self._record_kept():
                    record_wait = 1.0
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), record_wait)
                record_wait = min(record_wait * 2, RECORD_RETRY_MAX)
                continue
            try:
                now = self.clock()
                if self._next_at is not None and self._next_at <= now:
                    self._forget()  # a delivery the last look saw coming is due now
                    self._next_at = None
                if self._retry_due:  # ... or one recorded since: a look aside reads it
                    due_now = [name for name, at in self._retry_due.items() if at <= now]
                    if due_now:
                        for name in due_now:
                            del self._retry_due[name]
                        self._wanted.update(due_now)
                        self._forget()
                if now - self._looked_at >= IDLE_RECHECK:
                    self._forget()  # the backstop holds under steady traffic too (once per
                    self._looked_at = now  # IDLE_RECHECK while looks aside keep the queue full)
                names, busy = self._open_destinations(now)
                self._open = frozenset(names)
                self._accepting = self._open | busy if self._aside else self._open
                looked = False
                if self._room() and not self._ready and not self._open <= self._covered:
                    looked = True
                    # Fetch a good batch at once: one read per batch, not one per slot. Hosts
                    # that are suspended or at their limit are left out of the query, so their
                    # backlog never stands in front of other hosts' deliveries.
                    exclude = self._inflight.keys() | self._unrecorded.keys() | \
                        self._still_parked(now)
                    # Offers made while the look reads wait for its answer (_held_offers):
                    # it may return the same rows.
                    self._covered = frozenset()
                    changes, self._looked_at = self._changes, now
                    self._looking = True
                    self._looks += 1
                    try:
                        batch = await self.spool.poll(now, max(self._limit * 4, PREFETCH), names,
                                                      exclude)
                    finally:
                        self._looking = False
                        held, self._held_offers = self._held_offers, []
                        self._held_bytes = 0
                    self._ready.extend(batch.due)
                    if self._lease is not None:
                        self._claimed_at.update((due.seq, now) for due in batch.due)
                    self._claimed.append((self._looks, frozenset(
                        [*(due.seq for due in batch.due), *batch.given_back])))
                    # It saw everything of the destinations it asked for only if it left
                    # nothing out and nothing changed while it read (a replay, a retry,
                    # another process's events); when only some destinations may have more
                    # (the look says which), everything of the others.
                    self._covered = frozenset() if self._changes != changes else \
                        self._open if batch.complete else \
                        self._open - batch.capped if batch.capped is not None else frozenset()
                    self._next_at = batch.next_at
                    self._seen_upto = batch.seen_upto
                    self._seen_for.clear()
                    self._wanted.difference_update(names)
                    # Rows offered meanwhile are this look's if it could see them (seq up to
                    # seen_upto); the others are offered again now, after what it saw.
                    for receipt in held:
                        self.offer(receipt)
                elif self._aside and self._wanted and self._room() and self._ready and \
                        len(self._ready) < self._ready_rows and \
                        self._ready.size < self._ready_bytes:
                    aside = [name for name in names if name in self._wanted
                             and name not in self._covered and not self._ready.has(name)]
                    # (spaced: a later round does it; with room and a non-empty queue this
                    # round starts something, whose answer wakes the loop again)
                    if aside and now - self._aside_at >= ASIDE_EVERY:
                        self._aside_at = now
                        await self._look_aside(now, aside)
                for due_at in (self._next_at, min(self._retry_due.values(), default=None)):
                    if due_at is not None:
                        wait = min(max(0.0, due_at - now), wait)
                started = self._start_some()
                if (started or not looked) and not self._ready and self._room() and \
                        not self._open <= self._covered:
                    # the batch is used up and slots are free: more may be due; or this round
                    # could not look and dropped what waited on held-back hosts: look now
                    continue
                # The end of a suspension lets its probe go. (An end already past wakes
                # nothing: a host with nothing to send stays suspended, and its deliveries
                # are looked for when they come; one passed over is asked for again at once.)
                # An end that passed during this round (a look takes a while) wakes it once:
                # this round's look left the host out.
                round_at, now = now, self.clock()
                probe_at = min((until for h in self.health.hosts
                                if (until := self.health.blocked_until(h)) is not None
                                and until > round_at), default=None)
                if probe_at is not None:
                    wait = min(wait, max(0.0, probe_at - now))
                if self._recheck:
                    self._recheck = False
                    wait = 0.0
                # Deliveries held back by a rate limit may go when their next token is there.
                token_at = self.limits.next_at(self.clock(), self._limited)
                self._limited = set()
                if token_at is not None:
                    wait = min(wait, max(0.0, token_at - self.clock()))
            except SpoolError as exc:
                # (each round: every few ms in an outage)
                self._read_failed.say(log.error, "cannot read due deliveries: %s", exc)
                # The next read in a second, whatever wakes the loop meanwhile: each ingest
                # that fails in the outage wakes it, and each wake-up cost a read.
                await self._pause(READ_RETRY)
                continue
            # Otherwise: every slot is busy, or what is ready waits on busy hosts, or nothing is
            # due yet. A finished attempt, new work, the next due time or the end of a
            # suspension wakes the loop.
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                self._forget()  # a due time, a probe, a token or IDLE_RECHECK: look again

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until stopping; wake-ups meanwhile wait with it (the round
        after it looks at the spool again in any case)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._stopping:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
        self._forget()

    async def _look_aside(self, now: float, names: list[str]) -> None:
        """Read the due deliveries of open destinations that have none in the ready queue and
        whose offers the last look does not cover, while the queue still holds others' work:
        those whose new events were offered and could not start from memory (``_wanted``),
        each once per such offer.

        A full look waits until the ready queue is used up, and that queue can be one look's
        share of another destination's backlog: a destination whose new events could not start
        from memory (they came while the look read, or before it) waited for it, one look's
        backlog at the backlog's pace (half a second to 8 slots taking 20 ms; half a minute at
        1 s a request). None of these destinations' rows are in the queue, so this read cannot
        hand one out twice; what it covers of them, and up to which seq it saw them
        (``_seen_for``: their later offers above it are new), joins what the last look
        established. SQLite only: a PostgreSQL look claims rows, and sorting out its offers
        counts whole looks (offer_mark)."""
        exclude = self._inflight.keys() | self._unrecorded.keys() | self._still_parked(now)
        changes = self._changes
        self._looking = True
        try:
            # (the queue holds under one look's budget of event JSON, so with this one under
            # two: _run checks it before)
            batch = await self.spool.poll(now, max(self._limit * 4, PREFETCH), names, exclude)
        finally:
            self._looking = False
            held, self._held_offers = self._held_offers, []
            self._held_bytes = 0
        self._ready.extend(batch.due)
        self._wanted.difference_update(names)
        for name in names:
            self._seen_for[name] = max(self._seen_for.get(name, 0), batch.seen_upto)
        if self._changes == changes:
            seen = frozenset(names) if batch.complete else \
                frozenset(names) - batch.capped if batch.capped is not None else frozenset()
            self._covered |= seen & self._open
        if batch.next_at is not None and (self._next_at is None or batch.next_at < self._next_at):
            self._next_at = batch.next_at
        if batch.next_at is not None:  # their later retries (or other rows) falling due
            for name in names:
                known = self._retry_due.get(name)
                self._retry_due[name] = batch.next_at if known is None else \
                    min(known, batch.next_at)
        for receipt in held:
            self.offer(receipt)

    def _open_destinations(self, now: float) -> tuple[list[str], frozenset[str]]:
        """Destinations whose host takes requests now: not suspended, not at its limit (and
        every destination whose endpoint is chosen per event: that is judged per delivery);
        and those held back only by their host's limit (a request slot there is all they
        wait for)."""
        per_host = self.config.delivery.per_host_concurrency
        open_: list[str] = []
        busy: list[str] = []
        for host, names in self._host_destinations.items():
            if not self.health.is_blocked(host, now):
                (open_ if self._host_load[host] < per_host else busy).extend(names)
        open_ += self._templated
        limits = self.limits
        self._limited.update(name for name in open_ if not limits.ready(name, now))
        return [name for name in open_ if name not in self._limited], \
            frozenset(name for name in busy if limits.ready(name, now))

    def _room(self) -> bool:
        """A request slot is free (delivery.concurrency), and few enough answered deliveries
        wait for their outcome's commit."""
        limit = self._limit
        return len(self._requesting) < limit and len(self._inflight) < limit + RECORDING_MAX

    def _start_some(self) -> int:
        """Start ready deliveries while slots are free, passing over busy or suspended hosts."""
        if self._unrecorded or self._stopping:  # paused (an outcome waits to be recorded),
            self._clear_ready()                 # or stopping: nothing new starts
            self._forget()
            return 0
        per_host = self.config.delivery.per_host_concurrency
        started = 0
        waiting: list[Due] = []
        # lines passed over whole (ReadyQueue.take_line): none of their deliveries can start
        passed: dict[str, tuple[deque[Due], int]] = {}
        held = False  # some wait for more than a request slot at their host
        starved: dict[str, int] = {}   # destination -> its deliveries over the byte budget
        now = self.clock()
        # (the loop's own create_task: asyncio.create_task looks the loop up per call, and on
        # Python 3.11 that lookup is a getpid system call)
        create_task = asyncio.get_running_loop().create_task
        while self._ready and self._room():
            due = self._ready.popleft()
            if due.seq in self._inflight:
                continue  # already under way (queued twice): never sent twice at once
            target = self.destinations.get(due.destination)
            if target is None:
                self._forget()
                continue  # its destination was removed by a reload: it stays pending
            lease = self._lease
            claimed = self._claimed_at.get(due.seq) if lease is not None else None
            # (a lease shorter than the attempt itself is a config that cannot keep the
            # promise at all: start anyway, as before, rather than never)
            if claimed is not None and lease is not None and \
                    lease > target.timeout + LEASE_SLACK and \
                    claimed + lease - now < target.timeout + LEASE_SLACK:
                # PostgreSQL: its lease ends before this attempt could (it waited in memory
                # behind a slow host), and another replica may claim and send it meanwhile:
                # not started here. The next look claims it again, if no one else has.
                del self._claimed_at[due.seq]
                self._forget()
                continue
            if not self.limits.ready(target.name, now):
                self._count_limited(due.seq, target.name)
                waiting.append(due)  # over its rate limit: held like a suspended host's
                held = True
                continue
            size = len(due.event_json)
            if target.host is not None and self._host_load[target.host] >= per_host:
                # every delivery of this destination waits for a slot at that host
                self._pass_over(due, passed)
                continue
            if self._inflight and self._inflight_bytes + size > INFLIGHT_BYTES:
                # memory is bounded in bytes too: this one waits for a slot (smaller ones,
                # of this destination or another, may still fit; past a few, the rest of
                # this destination's line waits whole: a round costs no step per delivery)
                self._starved = held = True
                starved[due.destination] = tried = starved.get(due.destination, 0) + 1
                if tried > STARVED_TRIES:
                    self._pass_over(due, passed)
                else:
                    waiting.append(due)
                continue
            # An event-chosen endpoint is known once the request is rendered: render it now.
            prepared = self._prepare(due, target) if target.host is None else None
            host = target.host or (prepared.host if prepared else "")
            # At the end of a suspension, a delivery that never failed there probes first.
            busy = self._host_load[host] >= per_host
            if busy or not self.health.allow(host, now, fresh=due.attempts == 0):
                waiting.append(due)  # held: not attempted, no retry used
                held = True
                if target.host is None and self.health.is_blocked(host, now):
                    self._parked[due.seq] = host
                over = None if busy else self.health.blocked_until(host)
                if over is not None and over <= now:
                    # its suspension is over, but this one was passed over (or the probe is
                    # being claimed among replicas): the next round asks again at once
                    self._recheck = True
                continue
            self.limits.take(target.name, now)
            self._host_load[host] += 1
            # (allow() let it through and the host is probing: this attempt is the probe)
            self._requesting[due.seq] = (host, self.health.state_of(host) == "probing")
            self._inflight_bytes += size
            self._inflight[due.seq] = create_task(self._attempt(due, target, prepared))
            self._claimed_at.pop(due.seq, None)
            started += 1
        if len(self._requesting) < self._limit and not self._room():
            self._starved = True  # starts (and looks) wait for outcomes to be committed
        self._ready.extendleft(reversed(waiting))  # keep their place, oldest first
        self._ready.put_lines(passed)
        if (waiting or passed) and not started and (held or not self._aside or
                                                    not self._accepting <= self._covered):
            # Only held or busy hosts have work ready: drop it, so the next fetch (which leaves
            # those hosts out) can see other hosts' deliveries. (SQLite keeps what waits only
            # for a slot at a busy host while the last look covers every destination that
            # takes work: the next answer from that host starts it, with no read.)
            self._clear_ready()
            self._forget()
        return started

    def _pass_over(self, due: Due, passed: dict[str, tuple[deque[Due], int]]) -> None:
        """``due`` (just taken from the ready queue) and the rest of its destination's line
        wait for a later round, set aside at once."""
        line, size = self._ready.take_line(due.destination)
        line.appendleft(due)
        passed[due.destination] = (line, size + len(due.event_json))

    def _still_parked(self, now: float) -> set[int]:
        """Parked deliveries whose endpoint is still suspended (the others are let go)."""
        for seq, host in list(self._parked.items()):
            if not self.health.is_blocked(host, now):
                del self._parked[seq]
        return set(self._parked)

    def _count_limited(self, seq: int, destination: str) -> None:
        """relay_deliveries_total{outcome="limited"}: a delivery held back by a rate limit
        (counted once, however often it is passed over)."""
        self._limited.add(destination)
        if seq in self._limited_seqs:
            return
        self._limited_seqs[seq] = True
        self.limits.hold(destination)
        self.metrics.deliveries.labels(destination, "limited").inc()

    def _host_changed(self, host: Host, before: str, now: float) -> None:
        if host.state == "suspended":
            self.metrics.host_suspensions.labels(host.key).inc()
            if before == "healthy":
                self._spawn(self._count_held(host.key))
        if before == "suspended" and host.state == "probing":
            # The suspension is over: give its length back to the retry windows it ate into.
            held = now - host.suspended_at
            self._spawn(self.spool.add_held(self._host_destinations.get(host.key, []), held))
        self.wake()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _count_held(self, host: str) -> None:
        """relay_deliveries_total{outcome="held"}: deliveries waiting when a host is suspended."""
        queued = await self.spool.pending_by_destination()
        for name in self._host_destinations.get(host, []):
            if queued.get(name):
                self.metrics.deliveries.labels(name, "held").inc(queued[name])

    def held(self, destination: str) -> dict[str, Any] | None:
        """The 598 Host Unhealthy marker for a destination whose host is suspended now."""
        target = self.destinations.get(destination)
        if target is None or target.host is None:
            return None  # an event-chosen endpoint: held per endpoint, see /v1/hosts
        host = self.health.hosts.get(target.host)
        if host is None or host.state == "healthy":
            return None
        return {"status_code": HELD_STATUS, "reason": "Host Unhealthy", "host": target.host,
                "state": host.state, "until": host.suspended_until}

    def hosts(self, now: float) -> list[dict[str, Any]]:
        """Every destination host's health, destinations and attempts in flight (reading it
        creates no host entries)."""
        static = [self.health.peek(key, now) | {"destinations": names,
                                                "in_flight": self._host_load[key]}
                  | self._rate_limits(names, now)
                  for key, names in self._host_destinations.items()]
        chosen = [self.health.peek(key, now) | {"destinations": self._templated,
                                                "in_flight": self._host_load[key]}
                  for key in self.health.hosts if key not in self._host_destinations]
        return sorted(static + chosen, key=lambda entry: str(entry["host"]))

    def _rate_limits(self, names: list[str], now: float) -> dict[str, Any]:
        """``rate_limit``: per rate-limited destination, its bucket and deliveries held back."""
        limits = {name: shown for name in names
                  if (shown := self.limits.describe(name, now)) is not None}
        return {"rate_limit": limits} if limits else {}

    def _prepare(self, due: Due, target: CompiledDestination) -> _Prepared:
        """Render and sign one delivery's request, or the failed attempt that says why not."""
        started = self.clock()
        try:
            request = target.request(self._event(due), due.delivery_id)
        except RenderError as exc:
            return _Prepared(None, started, f"render:{target.name}",
                             Outcome("failed", error="render", detail=str(exc)),
                             Attempt(started, None, None, f"render: {exc}", None))
        except Exception as exc:  # a bug or a bad key: an attempt like any other, with backoff
            if due.attempts == 0:  # once per delivery, with the traceback; then plain lines
                log.exception("delivery %s to %s: cannot prepare the request", due.delivery_id,
                              due.destination, extra={"delivery_id": due.delivery_id,
                                                      "destination": due.destination})
            detail = f"cannot prepare the request: {type(exc).__name__}: {exc}"
            return _Prepared(None, started, f"render:{target.name}",
                             Outcome("retry", error="internal", detail=detail),
                             Attempt(started, None, None, f"internal: {detail}", None))
        return _Prepared(request, started, target.host or endpoint(request.url))

    def _answered(self, seq: int) -> None:
        """The host is done with this delivery's request (once; later calls do nothing): its
        slots, per host and overall, take the next one while the outcome is recorded (the
        delivery stays in flight until then, so no look hands it out again)."""
        taken = self._requesting.pop(seq, None)
        if taken is None:
            return
        host, probe = taken
        if probe and self.health.state_of(host) == "probing":
            # A probe that produced no answer to judge: the next request probes. The last
            # round saw the host probing and left its deliveries out: look again.
            self.health.abandon_probe(host, self.clock())
            self.wake()
        self._host_load[host] -= 1
        if self._ready or len(self._requesting) + 1 >= self._limit or \
                self._host_load[host] + 1 >= self.config.delivery.per_host_concurrency:
            self._wake.set()   # work may be waiting for this slot

    async def _attempt(self, due: Due, target: CompiledDestination,
                       prepared: _Prepared | None) -> None:
        try:
            await self.deliver(due, target, prepared)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not kill the dispatcher; the delivery stays pending
            log.exception("delivery %s: unexpected error", due.delivery_id)
            await asyncio.sleep(1.0)
            self.wake()  # still due in the spool: the next look takes it again
        finally:
            self._answered(due.seq)
            self._inflight_bytes -= len(due.event_json)
            self._inflight.pop(due.seq, None)
            if self._starved:   # a start was waiting for this outcome's commit
                self._starved = False
                self._wake.set()

    async def deliver(self, due: Due, target: CompiledDestination,
                      prepared: _Prepared | None = None) -> Outcome:
        """One attempt for one delivery, outcome committed to the spool before returning:
        render and sign (``prepared``, if not done yet) -> send -> classify -> decide ->
        record. A request that was sent is never sent again because its outcome could not be
        recorded (see _unrecorded). Its request slots are given back (``_answered``) before
        the outcome is recorded."""
        meters = self._meters.get(target.name)
        prepared = prepared or self._prepare(due, target)
        started, request = prepared.started, prepared.request
        if request is None:
            assert prepared.outcome is not None and prepared.attempt is not None
            outcome, attempt = prepared.outcome, prepared.attempt
        else:
            exchange = await send(target, self.transport, request, due.attempts + 1)
            outcome = classify(exchange, self.clock())
            excerpt = exchange.excerpt
            if excerpt:   # an echoing receiver's answer: the activity log keeps no secret
                excerpt = target.echoes.hide(excerpt, request)
            attempt = Attempt(exchange.started_at, exchange.duration, exchange.status,
                              exchange.error_text, excerpt)
            failed = counts_as_failure(outcome)
            if failed or outcome.status is not None:
                self.health.record(prepared.host, failed, self.clock())
            # else the host was not reached (refused by egress rules, no OAuth2 token, a bad
            # URL): nothing to judge it by; a probe is given up (_answered), not passed
            if meters is not None:
                meters.latency.observe(exchange.duration)
        self._answered(due.seq)
        now = self.clock()
        verdict = decide(outcome, due, now, target.policy, rand=self.rand(), started=started)
        try:
            await self._record(due, attempt, verdict)
        except SpoolError as exc:
            self._keep_unrecorded(due, attempt, verdict, exc)
            return outcome
        if verdict.state == "pending":  # a retry: its due time is news to the next look
            self._retry_soon(due.destination, verdict.not_before)
        if meters is not None and verdict.state in meters.counted:
            meters.counted[verdict.state].inc()
        _log_attempt(due, target, outcome, verdict, now)
        return outcome

    async def _record(self, due: Due, attempt: Attempt, verdict: Verdict) -> None:
        await self.spool.record_attempt(due, attempt, state=verdict.state,
                                        not_before=verdict.not_before,
                                        failures=verdict.failures, reason=verdict.reason)

    def _keep_unrecorded(self, due: Due, attempt: Attempt, verdict: Verdict,
                         exc: SpoolError) -> None:
        if not self._unrecorded:
            log.error("cannot record delivery outcomes (%s): dispatching is paused until the "
                      "spool takes them; the attempts made are kept, not repeated", exc)
        self._unrecorded[due.seq] = (due, attempt, verdict)
        self.record_error = str(exc)
        self._clear_ready()
        self.wake()

    async def _record_kept(self) -> bool:
        """Try to record every kept outcome; True once none is left."""
        for seq, (due, attempt, verdict) in list(self._unrecorded.items()):
            try:
                await self._record(due, attempt, verdict)
            except SpoolError as exc:
                self.record_error = str(exc)
                return False
            del self._unrecorded[seq]
        log.warning("delivery outcomes are recorded again: dispatching resumes")
        self.record_error = None
        return True

    def not_ready(self) -> str | None:
        """Why delivery is not working now (a supervised task down, or outcomes the spool
        cannot take so dispatching is paused), or None."""
        if self.supervisor.down:
            return "; ".join(f"task {name} is restarting after: {why}"
                             for name, why in sorted(self.supervisor.down.items()))
        if self._unrecorded:
            return (f"{len(self._unrecorded)} delivery outcomes cannot be recorded "
                    f"({self.record_error}); dispatching is paused")
        return None

    def _event(self, due: Due) -> Event:
        """The delivery's event, parsed once for all its destinations (within the budget).

        The oldest entry is dropped first, not the least recently used: an event's deliveries
        are mostly started one after another (one held back by a rate limit or a suspended
        host may parse its event again, 2 us), and a cachetools.LRUCache's bookkeeping in
        Python cost 0.9 us a miss, where this costs 0.3 (a miss per event with one
        destination)."""
        cache = self._events
        entry = cache.get(due.event_seq)
        if entry is not None:
            return entry[0]
        event = load_event(due.event_json)
        size = len(due.event_json)
        # (with one destination an event has one delivery: only its retry, much later, could
        # find it here; one huge event must not flush all the others)
        if size <= EVENT_CACHE_BYTES // 8 and len(self.destinations) > 1:
            cache[due.event_seq] = (event, size)
            self._event_bytes += size
            while self._event_bytes > EVENT_CACHE_BYTES or len(cache) > EVENT_CACHE_EVENTS:
                self._event_bytes -= cache.popitem(last=False)[1][1]
        return event


def _log_attempt(due: Due, target: CompiledDestination, outcome: Outcome, verdict: Verdict,
                 now: float) -> None:
    state = verdict.state
    if state == "delivered" and not log.isEnabledFor(logging.DEBUG):
        return  # the common case costs nothing
    extra: dict[str, Any] = {"delivery_id": due.delivery_id, "destination": due.destination,
                             "host": target.host, "outcome": state}
    if state == "delivered":
        log.debug("delivered %s to %s (%s)", due.delivery_id, due.destination, outcome.detail,
                  extra=extra)
    elif state == "pending":
        log.info("delivery %s to %s: %s; retry in %.0fs", due.delivery_id, due.destination,
                 outcome.detail, (verdict.not_before or now) - now, extra=extra)
    else:
        log.warning("delivery %s to %s failed: %s", due.delivery_id, due.destination,
                    outcome.detail, extra=extra)
