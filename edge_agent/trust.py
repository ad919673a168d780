"""Which signing key this agent trusts: the pinned one, or its successor by rotation.

The operator pins the controller's public key (``--trust-key``). When the controller
rotates its key, manifests arrive signed by a new key together with the chain of
endorsements; the agent follows the chain from the key it trusts (artifact.keychain),
and from then on trusts only the newest key. That key is kept in ``trusted-key.json``
in the state directory, with the id of the pinned key it descends from: pinning a
different key later (say, after a suspected theft) discards it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from artifact.files import atomic_write_bytes
from artifact.keychain import KeyEndorsement, follow_chain
from artifact.signing import SignatureError, TrustedKey

log = logging.getLogger(__name__)

STATE_NAME = "trusted-key.json"


class TrustAnchor:
    def __init__(self, pinned: TrustedKey, state_dir: Path) -> None:
        self.pinned = pinned
        self._path = state_dir / STATE_NAME
        self._current = self._load() or pinned

    @property
    def current(self) -> TrustedKey:
        return self._current

    def _load(self) -> TrustedKey | None:
        try:
            raw = json.loads(self._path.read_bytes())
            if raw["pinned_key_id"] != self.pinned.key_id:
                log.warning(
                    "ignoring %s: it follows pinned key %s, but key %s is pinned now",
                    self._path,
                    raw["pinned_key_id"],
                    self.pinned.key_id,
                )
                return None
            return TrustedKey.from_pem(raw["public_pem"].encode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, SignatureError) as exc:
            log.error("ignoring unreadable %s: %s", self._path, exc)
            return None

    def key_for(self, key_id: str, chain: Sequence[bytes]) -> TrustedKey:
        """The trusted key with ``key_id``: the current one, or one reached through ``chain``.

        Raises SignatureError when no verified chain leads there. The caller adopts a
        reached key with ``adopt`` only once a manifest has verified with it.
        """
        if not key_id or key_id == self._current.key_id:
            return self._current
        links = [KeyEndorsement.from_json_bytes(raw) for raw in chain]
        if not links:
            raise SignatureError(
                f"manifest signed by key {key_id}; this agent trusts key "
                f"{self._current.key_id} and was sent no endorsement that leads there"
            )
        return follow_chain(self._current, links, key_id)

    def adopt(self, key: TrustedKey) -> None:
        """Trust ``key`` from now on (and only it), across restarts."""
        if key.key_id == self._current.key_id:
            return
        document = {
            "pinned_key_id": self.pinned.key_id,
            "key_id": key.key_id,
            "public_pem": key.public_pem().decode("ascii"),
        }
        atomic_write_bytes(self._path, (json.dumps(document, indent=2) + "\n").encode())
        log.warning("signing key rotated: now trusting key %s instead of %s",
                    key.key_id, self._current.key_id)  # fmt: skip
        self._current = key
