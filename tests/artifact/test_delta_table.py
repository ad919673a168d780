"""The table of contents (format 3): old tensors by index, compact on a re-release, and safe.

A same-architecture int8 re-release must cost far less table than format 2 did (it
named every old tensor by offset, size, dtype and storage); a damaged table, however
its new fields are altered, raises CorruptPatchError and nothing else.
"""

from __future__ import annotations

import functools
import io
from dataclasses import replace
from pathlib import Path

import pytest

from artifact.delta import CorruptPatchError, UnsupportedPatchError, apply_delta_bytes, encode
from artifact.delta.format import FORMAT_VERSION, read_header
from artifact.delta.plan import plan_tensors
from artifact.delta.table import Table, old_tensors, pack_table, unpack_table
from tests.artifact import test_delta_damage, test_delta_quantized

V2_TABLE_BYTES = 299  # format 2's zstd'd table for the per-channel int8 → int8 pair below


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("table")


@functools.cache
def _plan() -> tuple[bytes, Table]:
    old, new = test_delta_damage.pair()
    plan = plan_tensors(old, new, level=19, min_tensor_bytes=64)
    return old, Table(123, plan.old_cuts, plan.params, plan.blocks)


def test_an_int8_re_release_table_is_well_under_format_2(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)  # ORT may leave shape-inference files in the cwd
    models = test_delta_quantized._models(work, True)
    old, new = models["int8"], models["int8_tuned"]
    encoded = encode(old, new)
    assert encoded.stats.mode == "delta"
    assert apply_delta_bytes(old, encoded.payload) == new
    assert encoded.stats.table_coded < 0.62 * V2_TABLE_BYTES, encoded.stats.table_coded


def test_the_table_round_trips_against_the_old_tensor_list() -> None:
    old, table = _plan()
    refs = old_tensors(old)
    assert refs, "the test model has tensors"
    assert unpack_table(pack_table(table, refs), refs) == table
    # with no list (a base that is not a model) every reference is explicit
    assert unpack_table(pack_table(table, ()), ()) == table
    assert len(pack_table(table, refs)) < len(pack_table(table, ()))


def test_references_past_the_old_tensor_list_are_corruption() -> None:
    old, table = _plan()
    refs = old_tensors(old)
    raw = pack_table(table, refs)
    for shorter in (refs[:1], refs[:-1], ()):
        with pytest.raises(CorruptPatchError):
            unpack_table(raw, shorter)


def test_every_altered_table_byte_raises_corruption_or_decodes() -> None:
    """Each byte of the raw table set to other values: CorruptPatchError or a Table."""
    old, table = _plan()
    refs = old_tensors(old)
    raw = pack_table(table, refs)
    for pos in range(len(raw)):
        for value in (0, 1, 2, 3, 0x7F, 0x80, 0xFF, raw[pos] ^ 1):
            altered = bytearray(raw)
            altered[pos] = value
            try:
                unpack_table(bytes(altered), refs)
            except CorruptPatchError:
                continue
    with pytest.raises(CorruptPatchError):
        unpack_table(raw + b"\x00", refs)
    with pytest.raises(CorruptPatchError):
        unpack_table(raw[:-1], refs)


def test_a_version_2_delta_is_refused_by_name() -> None:
    old, _ = test_delta_damage.pair()
    payload = test_delta_damage.payloads()["delta"]
    header = read_header(io.BytesIO(payload))
    assert header.version == 4 and FORMAT_VERSION == 5  # no ZSTD_QDQ: written as version 4
    older = replace(header, version=2).pack() + payload[len(header.pack()) :]
    with pytest.raises(UnsupportedPatchError, match="format version 2 is not supported"):
        apply_delta_bytes(old, older)
