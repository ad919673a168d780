"""sha256 digests: how both sides name artifact bytes, and how they check them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # whole string: fullmatch
_READ_BLOCK = 1 << 20


class InvalidDigestError(ValueError):
    """A string that was meant to be a sha256 digest is not one."""


def check_sha256(value: str, *, field: str = "sha256") -> str:
    """Return ``value`` if it is 64 lowercase hex characters, else raise saying so."""
    if not SHA256_HEX.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidDigestError(
            f"{field} must be 64 lowercase hex characters (a sha256 digest), got {shown!r}"
        )
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Digest a file in blocks, so memory stays flat for large models."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()
