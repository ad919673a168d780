"""The controller's revocation list: signed by the CA or refused, current, never loosened
by a broken file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from artifact.tls import CRL_FILE, TlsError
from controller.revocation import RevocationList
from tests.support.pki import make_pki


def test_follows_the_file_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ca = pki.ca()
    crl = tmp_path / "crl.pem"
    revoked = RevocationList(crl, ca.cert, check_interval_s=0)
    assert not revoked.is_revoked(7)  # no file: nothing revoked
    ca.revoke(7, crl)
    assert revoked.is_revoked(7) and not revoked.is_revoked(8)
    ca.revoke(8, crl)
    assert revoked.is_revoked(7) and revoked.is_revoked(8)
    crl.write_bytes(b"truncated by a bad copy")
    assert revoked.is_revoked(7) and revoked.is_revoked(8)  # still in force
    crl.unlink()
    assert revoked.is_revoked(7)  # a deleted list revokes nothing back
    ca.revoke(9, crl)  # the CA's own record still has 7 and 8: number 3 holds all three
    assert revoked.is_revoked(7) and revoked.is_revoked(8) and revoked.is_revoked(9)


def test_a_list_that_drops_a_revoked_certificate_is_ignored(tmp_path: Path) -> None:
    """Revocation is for good: a newer-numbered list missing a serial is a wrong file."""
    ca = make_pki(tmp_path / "pki").ca()
    crl = tmp_path / "crl.pem"
    ca.revoke(7, crl)
    revoked = RevocationList(crl, ca.cert, check_interval_s=0)
    elsewhere = dataclasses.replace(ca, directory=None)  # a CA copy without its record
    partial = tmp_path / "partial.pem"
    for _ in range(3):
        elsewhere.revoke(12, partial)  # number 3 > 1, but 7 is missing
    crl.write_bytes(partial.read_bytes())
    assert revoked.is_revoked(7) and not revoked.is_revoked(12)


def test_revoking_into_two_lists_keeps_every_revocation_in_both(tmp_path: Path) -> None:
    """The README's `--crl tls/controller/crl.pem` once, the default `ca/crl.pem` next:
    copying the second over the first must not let the first device back in."""
    pki = make_pki(tmp_path / "pki")
    ca = pki.ca()
    controller_crl = tmp_path / "controller" / CRL_FILE
    controller_crl.parent.mkdir()
    ca.revoke(1, controller_crl)
    revoked = RevocationList(controller_crl, ca.cert, check_interval_s=0)
    ca.revoke(2, pki.ca_dir / CRL_FILE)
    controller_crl.write_bytes((pki.ca_dir / CRL_FILE).read_bytes())
    assert revoked.is_revoked(1) and revoked.is_revoked(2)


def test_an_old_copy_of_the_list_does_not_let_revoked_devices_back(tmp_path: Path) -> None:
    ca = make_pki(tmp_path / "pki").ca()
    crl = tmp_path / "crl.pem"
    ca.revoke(7, crl)
    first = crl.read_bytes()
    ca.revoke(8, crl)
    revoked = RevocationList(crl, ca.cert, check_interval_s=0)
    crl.write_bytes(first)  # restored from an old backup: number 1 < 2
    assert revoked.is_revoked(8)


def test_a_list_the_ca_did_not_sign_is_refused_at_start(tmp_path: Path) -> None:
    ours, theirs = make_pki(tmp_path / "ours"), make_pki(tmp_path / "theirs")
    crl = tmp_path / "crl.pem"
    theirs.ca().revoke(7, crl)
    with pytest.raises(TlsError, match="not signed by the CA"):
        RevocationList(crl, ours.ca().cert)
    crl.write_bytes(b"garbage")
    with pytest.raises(TlsError, match="not a PEM certificate revocation list"):
        RevocationList(crl, ours.ca().cert)


def test_a_list_from_another_ca_appearing_later_changes_nothing(tmp_path: Path) -> None:
    ours, theirs = make_pki(tmp_path / "ours"), make_pki(tmp_path / "theirs")
    crl = tmp_path / "crl.pem"
    ours.ca().revoke(7, crl)
    revoked = RevocationList(crl, ours.ca().cert, check_interval_s=0)
    crl.unlink()
    theirs.ca().revoke(9, crl)  # someone swapped in a list that would un-revoke 7
    assert revoked.is_revoked(7) and not revoked.is_revoked(9)
