"""The controller's manifest-signing key: created on first start, its public half beside it."""

from __future__ import annotations

from pathlib import Path

from artifact.files import atomic_write_bytes
from artifact.signing import SigningKey

PRIVATE_NAME = "signing.pem"
PUBLIC_NAME = "signing.pub.pem"


def load_signing_key(key_dir: Path) -> SigningKey:
    """Load (or create) ``key_dir/signing.pem``; (re)write ``signing.pub.pem`` for agents to pin."""
    key_dir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.load_or_create(key_dir / PRIVATE_NAME)
    public = key_dir / PUBLIC_NAME
    pem = key.public_pem()
    if not public.exists() or public.read_bytes() != pem:
        atomic_write_bytes(public, pem)
    return key


def public_key_path(key_dir: Path) -> Path:
    return key_dir / PUBLIC_NAME
