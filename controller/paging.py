"""Page tokens for listings a client walks page by page (AIP-158 style).

A token is opaque to clients: URL-safe base64 of a small JSON array naming the format,
the filter the first page was asked with and the key of the last item returned (a
device id; a model, class and version). Carrying the filter lets the controller refuse
a token replayed with another filter, instead of silently mixing two listings. Any
replica can continue a listing another started: the token is the whole state.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from controller.errors import invalid

TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 1024
Key = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class PageToken:
    """Where the next page starts: after ``after``, in the listing filtered by ``scope``."""

    scope: str
    after: Key

    def encode(self) -> str:
        raw = json.dumps([TOKEN_VERSION, self.scope, list(self.after)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(
        cls, token: str, scope: str, key: tuple[type, ...], field: str = "page_token"
    ) -> PageToken | None:
        """None for "" (the first page); INVALID_ARGUMENT for a token this listing did
        not issue (``key``: the types of its items' key), or one issued for another
        ``scope`` (the filter)."""
        if not token:
            return None
        expected = f"{field} must be a next_page_token from the previous page of this listing"
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid(f"{expected}; got {len(token)} characters")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            value = json.loads(raw)
        except (binascii.Error, ValueError) as exc:
            raise invalid(f"{expected}; {token[:40]!r} is not one") from exc
        if not (
            isinstance(value, list)
            and len(value) == 3
            and value[0] == TOKEN_VERSION
            and isinstance(value[1], str)
            and isinstance(value[2], list)
            and len(value[2]) == len(key)
            and all(type(v) is t for v, t in zip(value[2], key, strict=True))
        ):
            raise invalid(f"{expected}; {token[:40]!r} is not one")
        if value[1] != scope:
            raise invalid(
                f"{field} was issued for the filter {value[1]!r}, not {scope!r}: repeat the "
                "request with the same filter, or start again without a page_token"
            )
        return cls(scope=value[1], after=tuple(value[2]))


# A page's items may add up to this many bytes (about: see ``approx_bytes``), half of
# gRPC's 8 MiB message limit; a page of long items ends early, with a token for the rest.
MAX_PAGE_BYTES = 4 << 20


def approx_bytes(item: object) -> int:
    """About how large ``item`` is on the wire: its repr (field names included, so never
    less than the protobuf, which writes numbers for them)."""
    return len(repr(item))


def within_bytes(items: list[T], budget: int = MAX_PAGE_BYTES) -> int:
    """How many leading ``items`` fit in ``budget`` bytes (at least one)."""
    total = 0
    for index, item in enumerate(items):
        total += approx_bytes(item)
        if total > budget and index > 0:
            return index
    return len(items)


def cut_page(items: list[T], size: int, scope: str, key: Callable[[T], Key]) -> tuple[list[T], str]:
    """``items`` (fetched ``size`` + 1 at most) cut to one page, and the token for the
    next page ("" when the extra item is not there: this was the last page). A page
    whose items exceed MAX_PAGE_BYTES ends early (a device with many long status
    reasons would otherwise make a page too large to send)."""
    fits = within_bytes(items[:size])
    if len(items) <= size and fits == len(items):
        return items, ""
    page = items[: min(size, fits)]
    return page, PageToken(scope, key(page[-1])).encode()
