"""relay.frozen: the per-attempt records are frozen to the type checker and cheap to build."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api as mypy_api

from relay.policy import Outcome, Verdict
from relay.request import Exchange, Request
from relay.spool.records import Attempt, Due


def test_mypy_refuses_assigning_to_a_field(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent("""
        from relay.frozen import frozen

        @frozen
        class Point:
            x: int
            y: int = 0

        point = Point(1)
        point.x = 2
        Point("one")
    """))
    out, _, status = mypy_api.run([str(snippet), "--no-incremental", "--strict",
                                   "--follow-imports=silent"])
    assert status == 1, out
    assert 'Property "x" defined in "Point" is read-only' in out
    assert 'Argument 1 to "Point" has incompatible type "str"' in out
    assert out.count("error:") == 2, out


def test_the_records_keep_value_equality_and_a_hash() -> None:
    records = [
        (Request("POST", "https://h/x", {"A": "1"}, b"{}"),
         Request("POST", "https://h/x", {"A": "1"}, b"{}")),
        (Exchange(1.0, 0.1, 200, {}, "ok"), Exchange(1.0, 0.1, 200, {}, "ok")),
        (Outcome("delivered", status=200), Outcome("delivered", status=200)),
        (Verdict("pending", 5.0, 1, "503"), Verdict("pending", 5.0, 1, "503")),
        (Attempt(1.0, 0.1, 200, None, "ok"), Attempt(1.0, 0.1, 200, None, "ok")),
        (Due(1, "dlv", "d", 0, 0, None, 0.0, 1, "{}"), Due(1, "dlv", "d", 0, 0, None, 0.0, 1, "{}")),
    ]
    for one, same in records:
        assert one == same and one is not same
        assert not hasattr(one, "__dict__")   # slotted
        if not isinstance(one, Request | Exchange):   # their dict fields are not hashable
            assert hash(one) == hash(same) and len({one, same}) == 1
    assert Outcome("delivered", status=200) != Outcome("delivered", status=201)
