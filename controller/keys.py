"""The controller's manifest-signing key, its rotation, and the chain agents follow.

Layout of ``key_dir`` (``DATA_DIR/keys``):
    signing.pem          the current private key (0600), created on first start
    signing.pub.pem      its public half: what agents pin (``--trust-key``)
    chain.json           endorsements, oldest first: each retired key vouches for the next
    retired/<id>.pem     retired private keys, kept so an operator can audit old signatures

Rotation writes the new key and its endorsement before it switches ``signing.pem``, each
file atomically, so a crash in between leaves either the old key in use or the new one
with its endorsement on record — never a key agents cannot reach.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from artifact.files import atomic_write_bytes
from artifact.keychain import KeyEndorsement, endorse
from artifact.signing import SignatureError, SigningKey

PRIVATE_NAME = "signing.pem"
PUBLIC_NAME = "signing.pub.pem"
CHAIN_NAME = "chain.json"
RETIRED_DIR = "retired"


class KeyStoreError(RuntimeError):
    """The key directory is unreadable or inconsistent; the message says what to fix."""


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


def load_key_chain(key_dir: Path) -> list[KeyEndorsement]:
    """The endorsements on record, oldest first (empty before the first rotation)."""
    path = key_dir / CHAIN_NAME
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_bytes())
        if not isinstance(raw, list):
            raise ValueError("expected a JSON list of endorsements")
        return [KeyEndorsement.model_validate(item) for item in raw]
    except (OSError, ValueError, SignatureError) as exc:
        raise KeyStoreError(f"{path} is not a readable key chain: {exc}") from exc


@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str
    endorsement: KeyEndorsement


def _private_pem(key: SigningKey) -> bytes:
    return key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def rotate_signing_key(key_dir: Path) -> Rotation:
    """Retire the current key: a new key, endorsed by the old one, signs from now on.

    Run it while the controller is stopped (it loads the key at start); agents follow
    the endorsement the next time they receive a manifest.
    """
    if not (key_dir / PRIVATE_NAME).exists():
        raise KeyStoreError(
            f"{key_dir / PRIVATE_NAME} does not exist: there is no key to rotate yet "
            "(`homefleet controller keys create` or a first start creates it)"
        )
    old = load_signing_key(key_dir)
    chain = load_key_chain(key_dir)
    new = SigningKey.generate()
    link = endorse(old, new)
    retired = key_dir / RETIRED_DIR
    retired.mkdir(exist_ok=True)
    atomic_write_bytes(retired / f"{old.key_id}.pem", _private_pem(old))
    (retired / f"{old.key_id}.pem").chmod(0o600)
    document = [e.model_dump(mode="json") for e in [*chain, link]]
    atomic_write_bytes(key_dir / CHAIN_NAME, (json.dumps(document, indent=2) + "\n").encode())
    atomic_write_bytes(key_dir / PRIVATE_NAME, _private_pem(new))
    (key_dir / PRIVATE_NAME).chmod(0o600)
    atomic_write_bytes(key_dir / PUBLIC_NAME, new.public_pem())
    return Rotation(old.key_id, new.key_id, link)
