"""Key rotation: an agent pinned to an old key follows verified endorsements, nothing else."""

from __future__ import annotations

import pytest

from artifact.keychain import KeyEndorsement, endorse, follow_chain
from artifact.signing import SignatureError, SigningKey, TrustedKey


def trusted(key: SigningKey) -> TrustedKey:
    return TrustedKey(key.private.public_key())


def test_a_chain_of_rotations_is_followed_from_any_pinned_key() -> None:
    k1, k2, k3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    chain = [endorse(k1, k2), endorse(k2, k3)]
    assert follow_chain(trusted(k1), chain, k3.key_id).key_id == k3.key_id
    assert follow_chain(trusted(k2), chain, k3.key_id).key_id == k3.key_id  # pinned later
    assert follow_chain(trusted(k3), chain, k3.key_id).key_id == k3.key_id
    reached = follow_chain(trusted(k1), chain, k3.key_id)
    reached.verify(b"manifest", k3.sign(b"manifest"))  # the reached key really is k3's


def test_an_endorsement_by_a_key_the_agent_does_not_trust_leads_nowhere() -> None:
    k1, stranger, k2 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    with pytest.raises(SignatureError, match="no chain of endorsements"):
        follow_chain(trusted(k1), [endorse(stranger, k2)], k2.key_id)


def test_a_forged_endorsement_is_refused() -> None:
    k1, k2, attacker = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    genuine = endorse(k1, k2)
    swapped_key = endorse(k1, attacker).public_pem
    forged = genuine.model_copy(
        update={"public_pem": swapped_key, "key_id": attacker.key_id}
    )  # claims k1 endorsed the attacker's key, with the signature of another statement
    with pytest.raises(SignatureError, match="does not verify"):
        follow_chain(trusted(k1), [forged], attacker.key_id)


def test_an_endorsement_whose_key_does_not_match_its_id_is_refused() -> None:
    k1, k2, k3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    link = endorse(k1, k2)
    lying = KeyEndorsement.model_validate(
        {**link.model_dump(), "public_pem": endorse(k1, k3).public_pem}
    )
    resigned = lying.model_copy(
        update={"signature_b64": endorse(k1, k2).signature_b64}
    )  # even a valid-looking record cannot bind id k2 to k3's key
    with pytest.raises(SignatureError):
        follow_chain(trusted(k1), [resigned], k2.key_id)


def test_an_endorsement_round_trips_as_json_and_bad_json_is_refused() -> None:
    link = endorse(SigningKey.generate(), SigningKey.generate())
    assert KeyEndorsement.from_json_bytes(link.to_json_bytes()) == link
    with pytest.raises(SignatureError, match="schema"):
        KeyEndorsement.from_json_bytes(b'{"key_id": "x"}')
