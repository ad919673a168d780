"""Walking a paged listing (ListDevices, ListArtifacts, ListModels) from the CLI.

The controller sends at most a page per call; a listing command asks for pages until
the controller says there are no more, or until ``--limit`` items are in hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
PAGE_SIZE = 1000  # items asked for per call


@dataclass(frozen=True)
class Fetched(Generic[T]):
    items: list[T]
    more: bool  # the listing goes on past ``items`` (``limit`` stopped the walk)


def fetch_pages(
    call: Callable[[int, str], tuple[list[T], str]], limit: int = 0, page_size: int = PAGE_SIZE
) -> Fetched[T]:
    """Every item ``call(page_size, page_token) -> (items, next_page_token)`` returns,
    page after page; with ``limit`` > 0, at most that many."""
    items: list[T] = []
    token = ""
    while True:
        wanted = min(limit - len(items), page_size) if limit else page_size
        page, token = call(wanted, token)
        items += page
        if not token or (limit and len(items) >= limit):
            return Fetched(items, bool(token))
