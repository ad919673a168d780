"""Wall-clock time as integer unix milliseconds: how the controller stores and sends time."""

from __future__ import annotations

import time


def unix_ms() -> int:
    return time.time_ns() // 1_000_000
