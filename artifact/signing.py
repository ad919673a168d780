"""ed25519 signatures over canonical manifest bytes.

The controller holds the private key; agents pin the public key and check every
manifest before they fetch or load anything it names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from artifact.files import atomic_write_bytes


class SignatureError(ValueError):
    """A manifest signature is missing, made by another key, or does not match."""


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.private.public_key())

    def sign(self, manifest_json: bytes) -> bytes:
        return self.private.sign(manifest_json)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load the PEM private key at ``path``, creating it (mode 0600) when absent."""
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise SignatureError(f"{path} holds a private key that is not ed25519")
            return cls(loaded)
        key = cls.generate()
        pem = key.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(path, pem)
        path.chmod(0o600)
        return key


@dataclass(frozen=True)
class TrustedKey:
    """A pinned public key on the device."""

    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustedKey:
        loaded = serialization.load_pem_public_key(pem)
        if not isinstance(loaded, Ed25519PublicKey):
            raise SignatureError("the pinned public key is not an ed25519 key (PEM expected)")
        return cls(loaded)

    def verify(self, manifest_json: bytes, signature: bytes) -> None:
        """Raise SignatureError unless ``signature`` is this key's over ``manifest_json``."""
        if not signature:
            raise SignatureError("manifest is unsigned")
        try:
            self.public.verify(signature, manifest_json)
        except InvalidSignature as exc:
            raise SignatureError(
                f"manifest signature does not verify with pinned key {self.key_id}"
            ) from exc
