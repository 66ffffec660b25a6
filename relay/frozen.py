"""``@frozen``: a value class that the type checker treats as a frozen dataclass, and that runs
as a plain slotted one.

For the records every delivery attempt builds (its request, the transport's exchange, the
outcome, the verdict, the attempt, the due row): eight or nine of them per attempt, where a
frozen dataclass's ``__init__`` (one ``object.__setattr__`` call per field) cost about 4x a
plain one's, 2-5 us of the dispatcher's ~32 per delivery (bench/dispatch.py). mypy still
refuses any assignment to a field; they keep value equality and a hash over their fields.
Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def frozen(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True, slots=True)`` to mypy; ``slots=True, unsafe_hash=True`` at run
    time (hashable over its fields, as a frozen one is)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
