"""Hiding secrets in what a receiver answered.

A receiver that echoes the request (many test endpoints do) puts the credentials the relay sent
into its answer: the test send shows that answer. ``hide`` replaces each known secret in such
text with ``****``; ``hide_in`` does so in an ``Exchange``'s response headers and body excerpt.
Never changes what is sent, nor a response's status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multidict import CIMultiDict

from relay.auth import MASKED
from relay.request import Exchange

ECHO_MIN = 4   # a shorter secret is not looked for (it would hide common text)


def hide(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` (in the order given: longest first, so a secret that
    contains another is hidden whole) replaced by ``****``; ``text`` itself when none is in
    it. Secrets shorter than ``ECHO_MIN`` are left alone."""
    for secret in secrets:
        if len(secret) >= ECHO_MIN and secret in text:
            text = text.replace(secret, MASKED)
    return text


def hide_in(exchange: Exchange, secrets: Sequence[str]) -> Exchange:
    """``exchange`` with ``secrets`` hidden in its response headers and body excerpt (the
    same object when none was echoed); header names still compare case-insensitively."""
    excerpt = hide(exchange.excerpt, secrets) if exchange.excerpt else exchange.excerpt
    headers = exchange.headers
    if any(hide(value, secrets) is not value for value in headers.values()):
        headers = CIMultiDict((name, hide(value, secrets)) for name, value in headers.items())
    if excerpt is exchange.excerpt and headers is exchange.headers:
        return exchange
    return dataclasses.replace(exchange, headers=headers, excerpt=excerpt)
