"""Manifests serialise canonically, and signatures cover exactly those bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from artifact.digest import InvalidDigestError, check_sha256, sha256_bytes, sha256_file
from artifact.files import atomic_write_bytes, atomic_writer
from artifact.manifest import InvalidManifestError, Manifest, RecipeStep, TensorSpec
from artifact.names import InvalidNameError, check_name
from artifact.signing import SignatureError, SigningKey, TrustedKey


def make_manifest(**overrides: object) -> Manifest:
    created = datetime(2026, 11, 1, tzinfo=UTC)
    fields: dict[str, object] = {
        "model_name": "motions",
        "model_version": 1,
        "device_class": "home-hub",
        "version": 3,
        "sha256": sha256_bytes(b"model"),
        "size_bytes": 5,
        "inputs": (TensorSpec(name="x", dtype="float32", shape=(-1, 6, 100)),),
        "outputs": (TensorSpec(name="logits", dtype="float32", shape=(-1, 4)),),
        "recipe": (RecipeStep(kind="identity"),),
        "metrics": {"size_bytes": 5.0},
        "created_at": created,
        "expires_at": created + timedelta(days=30),
    }
    fields.update(overrides)
    return Manifest.model_validate(fields)


def test_canonical_json_round_trips_byte_for_byte() -> None:
    manifest = make_manifest()
    raw = manifest.to_json_bytes()
    again = Manifest.from_json_bytes(raw)
    assert again == manifest
    assert again.to_json_bytes() == raw
    assert b" " not in raw  # no whitespace: one canonical form
    assert manifest.artifact_id == "motions/home-hub/v3"


def test_bad_manifests_are_refused_with_the_field_named() -> None:
    with pytest.raises(InvalidManifestError, match="sha256"):
        Manifest.from_json_bytes(
            make_manifest().to_json_bytes().replace(b'"sha256":"', b'"sha256":"zz')
        )
    with pytest.raises(InvalidManifestError):
        Manifest.from_json_bytes(b"not json")
    with pytest.raises(ValueError, match="name"):
        make_manifest(device_class="Home Hub")


def test_expiry() -> None:
    manifest = make_manifest()
    assert not manifest.is_expired(datetime(2026, 11, 2, tzinfo=UTC))
    assert manifest.is_expired(datetime(2027, 1, 1, tzinfo=UTC))


def test_signature_verifies_and_any_change_is_refused(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path / "keys" / "signing.pem")
    assert (tmp_path / "keys" / "signing.pem").stat().st_mode & 0o777 == 0o600
    again = SigningKey.load_or_create(tmp_path / "keys" / "signing.pem")
    assert again.key_id == key.key_id

    raw = make_manifest().to_json_bytes()
    signature = key.sign(raw)
    trusted = TrustedKey.from_pem(key.public_pem())
    trusted.verify(raw, signature)

    with pytest.raises(SignatureError, match="unsigned"):
        trusted.verify(raw, b"")
    tampered = raw.replace(b'"version":3', b'"version":4')
    with pytest.raises(SignatureError, match="does not verify"):
        trusted.verify(tampered, signature)
    other = TrustedKey.from_pem(SigningKey.generate().public_pem())
    with pytest.raises(SignatureError):
        other.verify(raw, signature)


def test_digests_and_names() -> None:
    digest = sha256_bytes(b"abc")
    assert check_sha256(digest) == digest
    for bad in ("", "../../etc/passwd", digest.upper(), digest[:-1], digest + "\n"):
        with pytest.raises(InvalidDigestError):
            check_sha256(bad)
    assert check_name("home-hub", field="device class") == "home-hub"
    # a trailing newline would spoof log lines and metric labels ("$" alone accepts one)
    for bad in ("", "Hub", "a/b", "../x", "x" * 65, "hub-1\n", "hub-1\nfake log line"):
        with pytest.raises(InvalidNameError, match="device class"):
            check_name(bad, field="device class")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
    assert sha256_file(target) == sha256_bytes(b"old")
