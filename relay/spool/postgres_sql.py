"""The PostgreSQL spool's statements: set-based, one round trip per group, text never changes.

Lists travel as arrays (``unnest``, ``= ANY``), so every statement is prepared once per
connection (asyncpg caches them) whatever the group's size. Names are unqualified: connections
have ``search_path`` set to the spool's schema.
"""

# Dedupe. Upsert every sender id of a group (first occurrence of each); a row is replaced only
# when older than the dedupe window ($4). Answers: 'c' rows claimed now (insert or replace),
# 'd' rows that were already there within the window (with their deliveries, as of the
# statement's snapshot), and one 'n' row: open_events for spool.max_events.
#
# Existing sender ids are looked up one by one, by a subquery per id of the group (here and in
# INGEST's ``go``): PostgreSQL cannot turn that into a join, so its only plans are a probe of
# the primary key per id or a scan per id, and the probe wins at any table size. A join with
# the group's ids (``s.id IN (SELECT id FROM input)``) let the plan that PostgreSQL caches
# after five executions, made while sender_ids was nearly empty, hash the group and scan all
# of sender_ids for every group as it grew, until the next ANALYZE (tests/
# test_postgres_plans.py; docs/performance.md, session 19).
CLAIM = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::float8[], $3::text[]) AS t(id, received_at, deliveries)),
claimed AS (
    INSERT INTO sender_ids AS s(id, received_at, deliveries)
    SELECT id, received_at, deliveries FROM input
    ON CONFLICT (id) DO UPDATE SET received_at = EXCLUDED.received_at,
                                   deliveries = EXCLUDED.deliveries
    WHERE s.received_at < $4
    RETURNING s.id)
SELECT 'c' AS kind, id, NULL AS deliveries FROM claimed
UNION ALL
SELECT 'd', id, deliveries FROM (
    SELECT i.id, (SELECT s.deliveries FROM sender_ids s WHERE s.id = i.id) AS deliveries
    FROM input i WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = i.id)) AS known
WHERE deliveries IS NOT NULL
UNION ALL
SELECT 'n', NULL, open_events::text FROM counters
"""

# A sender id another transaction inserted while ours waited on it (read committed: this
# statement sees the row that CLAIM's snapshot did not).
SENDER_IDS = "SELECT id, deliveries FROM sender_ids WHERE id = ANY($1::text[])"

OPEN_EVENTS = "SELECT open_events FROM counters"

def _stored(events: int, deliveries: int, where: str = "") -> str:
    """The CTEs ``e``, ``ins_e`` and ``ins_d`` that store a group's events (parameters from
    ``$events``: id, sender_id, received_at, pending, body; each seq drawn here, in order) and
    their deliveries (from ``$deliveries``: delivery_id, the event's place in the group,
    destination, state, now, reason, lease_until, and then the replica stored as lease_owner
    where lease_until is not NULL: the deliveries its dispatcher is offered, see
    PostgresSpool.offers). ``ins_d`` returns each delivery's id, seq, event seq and whether it
    is leased. INSERT and INGEST share them, so both paths store alike; ``where`` filters the
    events."""
    e, d = events, deliveries
    return f"""
e AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('events', 'seq')) AS seq, t.*
    FROM unnest(${e}::text[], ${e + 1}::bool[], ${e + 2}::float8[], ${e + 3}::int[],
                ${e + 4}::text[])
         WITH ORDINALITY AS t(id, sender_id, received_at, pending, body, ord){where}),
ins_e AS (
    INSERT INTO events(seq, id, sender_id, received_at, pending, body)
    SELECT seq, id, sender_id, received_at, pending, body FROM e),
ins_d AS (
    INSERT INTO deliveries(delivery_id, event_seq, destination, state, not_before, created_at,
                           updated_at, reason, lease_owner, lease_until)
    SELECT d.delivery_id, e.seq, d.destination, d.state, d.now, d.now, d.now, d.reason,
           CASE WHEN d.lease_until IS NOT NULL THEN ${d + 7}::text END, d.lease_until
    FROM unnest(${d}::text[], ${d + 1}::bigint[], ${d + 2}::text[], ${d + 3}::text[],
                ${d + 4}::float8[], ${d + 5}::text[], ${d + 6}::float8[])
         WITH ORDINALITY AS d(delivery_id, event_ord, destination, state, now, reason,
                              lease_until, ord)
    JOIN e ON e.ord = d.event_ord
    ORDER BY d.ord
    RETURNING delivery_id, seq, event_seq, lease_owner IS NOT NULL AS leased)"""


# Events with their deliveries (joined on the event's place in the group), and the open-events
# counter, in one statement. Answers the leased deliveries: id, and "seq event_seq".
INSERT = "WITH" + _stored(1, 6) + """,
cnt AS (UPDATE counters SET open_events = open_events + $14, released = released + 1)
SELECT delivery_id, seq || ' ' || event_seq FROM ins_d WHERE leased
"""

# A group's ingests in one statement, committed on its own (no BEGIN or COMMIT round trip):
# CLAIM and INSERT together, for the common case. It writes nothing unless no sender id of the
# group ($1) is a repeat within the dedupe window ($4) and the group's open events ($18) fit
# under spool.max_events ($19); the group then runs as CLAIM + INSERT in a transaction, which
# refuses requests one by one. A sender id another transaction stored after this statement's
# snapshot is not claimed, and its event is left out (the caller reads the winner's
# deliveries). Answers: 'c' rows claimed now, 'l' the deliveries stored leased (id, "seq
# event_seq"), and one row, 'w' (written) or 'n' (nothing written), with open_events as the
# statement saw it.
INGEST = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::float8[], $3::text[]) AS t(id, received_at, deliveries)),
go AS MATERIALIZED (
    SELECT NOT EXISTS (SELECT 1 FROM input i
                       WHERE (SELECT s.received_at FROM sender_ids s WHERE s.id = i.id) >= $4)
           AND open_events + $18 <= $19 AS ok, open_events
    FROM counters),
claimed AS (
    INSERT INTO sender_ids AS s(id, received_at, deliveries)
    SELECT id, received_at, deliveries FROM input WHERE (SELECT ok FROM go)
    ON CONFLICT (id) DO UPDATE SET received_at = EXCLUDED.received_at,
                                   deliveries = EXCLUDED.deliveries
    WHERE s.received_at < $4
    RETURNING s.id),""" + _stored(5, 10, """
    WHERE (SELECT ok FROM go) AND (NOT t.sender_id OR t.id IN (SELECT id FROM claimed))""") + """,
cnt AS (
    UPDATE counters SET open_events = open_events + (SELECT count(*) FROM e WHERE pending > 0),
                        released = released + 1
    WHERE (SELECT ok FROM go))
SELECT 'c' AS kind, id, NULL AS value FROM claimed
UNION ALL
SELECT 'l', delivery_id, seq || ' ' || event_seq FROM ins_d WHERE leased
UNION ALL
SELECT CASE WHEN ok THEN 'w' ELSE 'n' END, NULL, open_events::text FROM go
"""

# A group's refused requests had claimed sender ids: give each to the event stored for it
# later in the group, or drop it.
FIX_SENDER_IDS = """
WITH f AS (SELECT * FROM unnest($1::text[], $2::text[]) AS t(id, deliveries)),
gone AS (DELETE FROM sender_ids s USING f WHERE s.id = f.id AND f.deliveries IS NULL)
UPDATE sender_ids s SET deliveries = f.deliveries FROM f
WHERE s.id = f.id AND f.deliveries IS NOT NULL
"""

# Attempt outcomes, applied only where this replica ($2) still holds the lease; the events'
# pending counts and open_events follow. Answers the seqs applied.
RECORD = """
WITH o AS (
    SELECT * FROM unnest($3::bigint[], $4::int[], $5::float8[], $6::float8[], $7::int[],
                         $8::text[], $9::text[], $10::text[], $11::float8[], $12::int[],
                         $13::text[])
         AS t(seq, n, at, duration, status_code, error, excerpt, state, not_before, failures,
              reason)),
upd AS (
    UPDATE deliveries d SET attempts = o.n, failures = o.failures, state = o.state,
           not_before = o.not_before, updated_at = $1,
           first_attempt_at = COALESCE(d.first_attempt_at, o.at), reason = o.reason,
           lease_owner = NULL, lease_until = NULL
    FROM o WHERE d.seq = o.seq AND d.lease_owner = $2
    RETURNING d.seq, d.event_seq, o.state),
att AS (
    INSERT INTO attempts(delivery_seq, n, at, duration, status_code, error, excerpt)
    SELECT o.seq, o.n, o.at, o.duration, o.status_code, o.error, o.excerpt
    FROM o JOIN upd ON upd.seq = o.seq
    ON CONFLICT DO NOTHING),
fin AS (
    UPDATE events e SET pending = e.pending - c.n
    FROM (SELECT event_seq, count(*) AS n FROM upd WHERE state <> 'pending' GROUP BY event_seq) c
    WHERE e.seq = c.event_seq
    RETURNING e.pending),
cnt AS (
    UPDATE counters SET open_events = open_events - (SELECT count(*) FROM fin WHERE pending = 0),
                        released = released + (SELECT count(*) FROM upd WHERE state = 'pending'))
SELECT seq FROM upd
"""

# Claim due deliveries: rows no other replica holds an unexpired lease on, locked without
# waiting (SKIP LOCKED), leased to $4 until $5 + $7.
# - The candidates: each destination of $1 that has a due row ("busy", one probe each) gives
#   its first ``share`` of them, walked alone through deliveries_due (destination,
#   not_before, seq), LATERAL. A destination left out (a suspended host's, one at its limit)
#   is never read, however large its backlog: led by time, the index had every look walk it
#   (60,000 rows of a dead receiver's, per look).
# - ``share`` is $6 split between the busy destinations (rounded up), so a claim reads what it
#   takes however many destinations have a backlog (past $6 of them, one row and a probe each;
#   at $6 each, 100 of them made a claim of 256 read 26,000 rows), and every busy destination
#   gets its part: one destination's old backlog never fills a claim (tests/test_fairness.py).
#   A destination that gave its whole share may have more: the look says so (``capped``), and
#   is not complete.
# - The oldest $6 candidates that no one else is locking are locked, by primary key, from an
#   array: as a join, a plan made from statistics that saw no pending rows walked every
#   pending row and the candidates once for each (36 million rows to claim 200); for the same
#   reason a destination is probed by a subquery with a LIMIT, which cannot become a join (as
#   EXISTS, it was a semi-join over every pending row). A candidate locked elsewhere
#   (another replica's claim, a long update) is passed over for the next candidate, if any.
# - Their conditions are checked again on the rows locked (PostgreSQL checks them once more on
#   a row another transaction changed meanwhile), inside a CASE, from which the planner reads
#   no index condition: `state = 'pending'` alone let it walk deliveries_due whole instead of
#   taking the primary key.
_CLAIMABLE = "(lease_owner IS NULL OR lease_owner = $4 OR lease_until < $5)"
_DUE_ROWS = f"state = 'pending' AND seq <> ALL($2::bigint[]) AND not_before <= $3 AND {_CLAIMABLE}"
_CLAIMED = f"""
busy AS MATERIALIZED (
    SELECT DISTINCT w.name FROM unnest($1::text[]) AS w(name)
    WHERE (SELECT true FROM deliveries WHERE destination = w.name AND {_DUE_ROWS} LIMIT 1)),
share AS MATERIALIZED (
    SELECT ($6::int + count(*) - 1) / greatest(count(*), 1) AS n FROM busy),
candidates AS MATERIALIZED (
    SELECT b.name, x.seq FROM busy b CROSS JOIN LATERAL (
        SELECT seq FROM deliveries WHERE destination = b.name AND {_DUE_ROWS}
        ORDER BY not_before, seq LIMIT (SELECT n FROM share)) x),
c AS (
    SELECT seq FROM deliveries
    WHERE seq = ANY(ARRAY(SELECT seq FROM candidates))
      AND CASE WHEN state = 'pending' AND not_before <= $3 THEN {_CLAIMABLE} ELSE false END
    ORDER BY not_before, seq LIMIT $6::int
    FOR UPDATE SKIP LOCKED),
u AS (
    UPDATE deliveries d SET lease_owner = $4, lease_until = $5 + $7
    FROM c WHERE d.seq = c.seq
    RETURNING d.seq, d.delivery_id, d.destination, d.attempts, d.failures, d.first_attempt_at,
              d.held, d.event_seq, (SELECT body FROM events e WHERE e.seq = d.event_seq),
              d.not_before)"""
DUE = "WITH" + _CLAIMED + "\nSELECT * FROM u\n"


def _next_due(replica: str, clock: str, also: str = "") -> str:
    """The earliest time one of the deliveries of $1 (but not $2 ``also``) can be claimed by
    ``replica``: a not_before, or the end of another replica's lease on it (at ``clock``).
    Index probes, not a read of every pending row: each destination's first pending row no
    other replica holds (deliveries_due, one walk per destination, as _CLAIMED), and the end
    of the other replicas' leases (deliveries_leased: only rows in flight somewhere). The
    second names no state: a leased row is pending (every statement that ends a delivery or
    replays it clears its lease), and ``state = 'pending'`` let the planner walk
    deliveries_due, every pending row, whenever the statistics said few were pending."""
    rows = f"seq <> ALL($2::bigint[]){also}"
    return f"""least(
    (SELECT min((SELECT not_before FROM deliveries
                 WHERE destination = w.name AND state = 'pending' AND {rows}
                   AND (lease_owner IS NULL OR lease_owner = {replica} OR lease_until < {clock})
                 ORDER BY not_before LIMIT 1))
     FROM unnest($1::text[]) AS w(name)),
    (SELECT min(greatest(not_before, lease_until)) FROM deliveries
     WHERE lease_owner IS NOT NULL AND lease_owner <> {replica} AND lease_until >= {clock}
       AND destination = ANY($1::text[]) AND {rows}))"""


NEXT_DUE = "SELECT " + _next_due("$3", "$4")

# A look: DUE, and one more row (seq NULL) with the next time one of the rows it did not claim
# can be claimed (as NEXT_DUE; the claimed rows are this replica's now, due already), whether
# a destination gave its whole share of candidates, and the destinations that may have more
# due: those, and those some of whose candidates it did not claim (the limit cut them, or
# another transaction held them locked). One round trip where DUE and NEXT_DUE took two.
LOOK = "WITH" + _CLAIMED + """
SELECT *, NULL::float8 AS next_at, NULL::boolean AS capped, NULL::text[] AS short FROM u
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, """ + _next_due(
    "$4", "$5", " AND seq NOT IN (SELECT seq FROM c)") + """,
    EXISTS (SELECT 1 FROM candidates GROUP BY name HAVING count(*) >= (SELECT n FROM share)),
    ARRAY(SELECT k.name FROM (SELECT name, count(*) AS n FROM candidates GROUP BY name) k
          WHERE k.n >= (SELECT n FROM share)
             OR k.n > (SELECT count(*) FROM u WHERE u.destination = k.name))
"""

RELEASE = """
WITH r AS (UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1
           RETURNING 1)
UPDATE counters SET released = released + (SELECT count(*) FROM r)
RETURNING (SELECT count(*) FROM r)
"""
# Changes when another replica stores events or gives claims back (an idle replica polls it).
# Changes when another replica stores events or makes deliveries claimable: ``released``
# counts claims given back at close and, besides, every ingest (seqs commit out of order: the
# newest seq alone can miss one), retry recorded and replay. An idle replica, or one whose last
# look was complete, polls it (relay/service.py).
WORK_MARK = "SELECT (SELECT max(seq) FROM events), released FROM counters"
PENDING = "SELECT count(*) FROM deliveries WHERE state = 'pending'"

# Pruning runs on one replica at a time: the others find the lock taken and skip the round.
PRUNE_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext($1))"

REPLAY = """
WITH r AS (
    UPDATE deliveries SET state = 'pending', not_before = $1, failures = 0,
           first_attempt_at = NULL, held = 0, reason = NULL, updated_at = $1,
           lease_owner = NULL, lease_until = NULL
    WHERE seq IN (
        SELECT seq FROM deliveries
        WHERE state = 'failed' AND (cardinality($2::text[]) = 0 OR delivery_id = ANY($2))
          AND ($3::text IS NULL OR destination = $3)
          AND ($4::float8 IS NULL OR updated_at >= $4)
        ORDER BY seq LIMIT 100000 FOR UPDATE)
    RETURNING seq, delivery_id, event_seq),
e AS (
    UPDATE events SET pending = pending + c.n
    FROM (SELECT event_seq, count(*) AS n FROM r GROUP BY event_seq) c
    WHERE events.seq = c.event_seq
    RETURNING events.pending, c.n),
k AS (UPDATE counters SET open_events = open_events + (SELECT count(*) FROM e WHERE pending = n),
                         released = released + 1)
SELECT delivery_id FROM r ORDER BY seq
"""

ADD_HELD = """
UPDATE deliveries SET held = held + $2
WHERE state = 'pending' AND first_attempt_at IS NOT NULL AND destination = ANY($1::text[])
"""

PRUNE = """
WITH p AS (SELECT seq FROM events WHERE received_at < $1 AND pending = 0 LIMIT 10000),
da AS (DELETE FROM attempts WHERE delivery_seq IN (
           SELECT seq FROM deliveries WHERE event_seq IN (SELECT seq FROM p))),
dd AS (DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM p)),
de AS (DELETE FROM events WHERE seq IN (SELECT seq FROM p) RETURNING 1)
SELECT count(*) FROM de
"""

PRUNE_SENDER_IDS = """
DELETE FROM sender_ids WHERE id IN (SELECT id FROM sender_ids WHERE received_at < $1 LIMIT 10000)
"""

SELECT_DELIVERY = """
SELECT d.delivery_id, e.id, d.destination, d.state, d.attempts, d.not_before, d.created_at,
       d.updated_at, d.reason, d.seq
FROM deliveries d JOIN events e ON e.seq = d.event_seq
"""
GET_DELIVERY = SELECT_DELIVERY + " WHERE d.delivery_id = $1"
LIST_DELIVERIES = SELECT_DELIVERY + """
WHERE d.seq > $1 AND ($2::text IS NULL OR d.state = $2) AND ($3::text IS NULL OR d.destination = $3)
ORDER BY d.seq LIMIT $4
"""
ATTEMPTS_OF = """
SELECT delivery_seq, at, duration, status_code, error, excerpt FROM attempts
WHERE delivery_seq = ANY($1::bigint[]) ORDER BY delivery_seq, n
"""
EVENT_JSON = ("SELECT e.body FROM deliveries d JOIN events e ON e.seq = d.event_seq "
              "WHERE d.delivery_id = $1")
COUNTS = "SELECT state, count(*) FROM deliveries GROUP BY state"
PENDING_BY_DESTINATION = ("SELECT destination, count(*) FROM deliveries WHERE state = 'pending' "
                          "GROUP BY destination")
# The earliest not_before of any pending delivery, if due by $1: deliveries_due is led by
# destination, so each destination with pending rows is found by a skip from the one before
# and probed once (a "loose index scan"), not every pending row read. (ORDER BY ... LIMIT 1,
# not min(): with statistics that saw nothing pending, min() became an aggregate over the
# whole index.)
OLDEST_DUE = """
WITH RECURSIVE dst(name) AS (
    SELECT (SELECT destination FROM deliveries WHERE state = 'pending'
            ORDER BY destination LIMIT 1)
    UNION ALL
    SELECT (SELECT destination FROM deliveries WHERE state = 'pending'
            AND destination > dst.name ORDER BY destination LIMIT 1)
    FROM dst WHERE dst.name IS NOT NULL),
oldest(at) AS (
    SELECT min((SELECT not_before FROM deliveries WHERE state = 'pending'
                AND destination = dst.name ORDER BY not_before LIMIT 1))
    FROM dst)
SELECT at FROM oldest WHERE at <= $1
"""

# Give claims back (a due batch over its byte budget): they are claimable again at once, and
# counted in ``released`` as RELEASE's are, so the other replicas' followers hear of them
# should this replica not look again. Rows stored leased to this replica (offers) that the
# look had claimed are given back too: the dispatcher leaves them out of their offer.
UNCLAIM = """
WITH r AS (UPDATE deliveries SET lease_owner = NULL, lease_until = NULL
           WHERE seq = ANY($1::bigint[]) AND lease_owner = $2 RETURNING 1)
UPDATE counters SET released = released + (SELECT count(*) FROM r)
"""
