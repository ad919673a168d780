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
    assert not revoked.is_revoked(7)  # the operator removed the list


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
