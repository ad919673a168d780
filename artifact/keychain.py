"""Key rotation: the retiring signing key endorses its successor, and agents follow the chain.

An agent pins one public key when it is installed. When the controller rotates its key,
it signs a ``KeyEndorsement`` of the new public key with the old private key; it sends
the chain of endorsements with every manifest, so an agent that pinned any earlier key
walks the chain from its pinned key to the key that signed the manifest, checking
every link, and then pins the newest key in place of the old one (a retired key can
then no longer sign for that agent).

Limit, stated plainly: an attacker who steals the *current* key before a rotation can
endorse a key of their own. The Update Framework answers that with offline root keys
that only sign key changes; HomeFleet has one online key per controller, so a
suspected theft means re-installing the pinned key on devices.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from artifact.signing import SignatureError, SigningKey, TrustedKey

MAX_CHAIN = 32  # links an agent will walk; more means something is wrong


class KeyEndorsement(BaseModel):
    """``signer_key_id`` vouches that ``public_pem`` (id ``key_id``) signs from now on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str = Field(min_length=16, max_length=16)
    public_pem: str = Field(min_length=1, max_length=1024)
    signer_key_id: str = Field(min_length=16, max_length=16)
    created_at: datetime
    signature_b64: str = ""

    def signed_bytes(self) -> bytes:
        """Canonical JSON of everything but the signature: what the signer signs."""
        data = self.model_dump(mode="json", exclude={"signature_b64"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> KeyEndorsement:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise SignatureError(f"a key endorsement does not match its schema: {exc}") from exc

    def endorsed_key(self) -> TrustedKey:
        key = TrustedKey.from_pem(self.public_pem.encode())
        if key.key_id != self.key_id:
            raise SignatureError(
                f"key endorsement names key {self.key_id} but carries key {key.key_id}"
            )
        return key


def endorse(old: SigningKey, new: SigningKey, now: datetime | None = None) -> KeyEndorsement:
    """``old`` signs that ``new`` takes over."""
    pem = new.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = KeyEndorsement(
        key_id=new.key_id,
        public_pem=pem.decode("ascii"),
        signer_key_id=old.key_id,
        created_at=(now or datetime.now(UTC)).replace(microsecond=0),
    )
    signature = old.sign(unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature_b64": base64.b64encode(signature).decode()})


def follow_chain(
    pinned: TrustedKey, chain: Sequence[KeyEndorsement], target_key_id: str
) -> TrustedKey:
    """The key ``target_key_id``, reached from ``pinned`` through verified endorsements.

    ``chain`` may hold links from before ``pinned`` (an agent pinned later than the
    first rotation); they are skipped. Raises SignatureError naming the broken link.
    """
    if target_key_id == pinned.key_id:
        return pinned
    if len(chain) > MAX_CHAIN:
        raise SignatureError(f"the key chain has {len(chain)} links; at most {MAX_CHAIN}")
    current = pinned
    by_signer = {link.signer_key_id: link for link in chain}
    for _ in range(len(chain)):
        link = by_signer.get(current.key_id)
        if link is None:
            break
        try:
            signature = base64.b64decode(link.signature_b64, validate=True)
        except ValueError as exc:
            raise SignatureError(f"the endorsement of key {link.key_id} is not base64") from exc
        try:
            current.verify(link.signed_bytes(), signature)
        except SignatureError as exc:
            raise SignatureError(
                f"the endorsement of key {link.key_id} by key {current.key_id} does not verify"
            ) from exc
        current = link.endorsed_key()
        if current.key_id == target_key_id:
            return current
    raise SignatureError(
        f"no chain of endorsements leads from pinned key {pinned.key_id} to key {target_key_id}"
    )
