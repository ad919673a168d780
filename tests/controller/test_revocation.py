"""The controller's revocation list: signed by the CA or refused, current, never loosened
by a broken file."""

from __future__ import annotations

from pathlib import Path

import pytest

from artifact.tls import TlsError
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
    ca.revoke(9, crl)  # a new list (number 1, only 9): older than number 2 in force
    assert revoked.is_revoked(7) and not revoked.is_revoked(9)
    ca.revoke(10, crl)
    ca.revoke(11, crl)  # number 3: newer, in force
    assert revoked.is_revoked(11) and not revoked.is_revoked(7)


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
