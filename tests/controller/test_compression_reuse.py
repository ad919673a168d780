"""A controller job for a re-release reuses the class's static int8 artifact on its own.

The earlier release's artifact is put in the controller's own store and blob store (as
a finished job leaves it); the job for the new model version then runs in the real
process pool and publishes an artifact whose recipe names the artifact it reused.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from artifact.digest import sha256_file
from artifact.manifest import Manifest, RecipeStep, TensorSpec, utc_now
from controller.blobstore import BlobStore
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import Quantize
from controller.db import make_engine
from controller.jobs.handlers import previous_static_int8
from controller.records import ArtifactRecord
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import run, running_controller
from tests.controller.test_compression_jobs import POOL, classifier, follow, inputs, start

SPEC_IN = (TensorSpec(name="x", dtype="float32", shape=(-1, 32)),)
SPEC_OUT = (TensorSpec(name="logits", dtype="float32", shape=(-1, 8)),)


def fine_tuned(source: bytes) -> bytes:
    """The classifier with its last layer nudged: the re-release."""
    model = onnx.load_from_string(source)
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        if init.name == "w2":
            values = numpy_helper.to_array(init)
            moved = values + rng.normal(0, 0.01, values.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(moved, init.name))
    return model.SerializeToString()


def record(
    store: SqlStore, blobs: BlobStore, path: Path, version: int, recipe: tuple[RecipeStep, ...]
) -> ArtifactRecord:
    """An artifact of clf for home-hub, as a finished job leaves it (bytes and row)."""
    blob = blobs.put_bytes(path.read_bytes())
    now = utc_now()
    manifest = Manifest(
        model_name="clf",
        model_version=1,
        device_class="home-hub",
        version=version,
        sha256=blob.sha256,
        size_bytes=blob.size,
        inputs=SPEC_IN,
        outputs=SPEC_OUT,
        recipe=recipe,
        created_at=now,
        expires_at=now + timedelta(days=30),
    )
    return store.insert_artifact(
        ArtifactRecord(
            id=f"clf/home-hub/v{version}",
            model_name="clf",
            model_version=1,
            device_class="home-hub",
            version=version,
            sha256=blob.sha256,
            size_bytes=blob.size,
            manifest_json=manifest.to_json_bytes(),
            signature=b"not checked here",
            key_id="test",
            created_unix_ms=int(time.time() * 1000),
        )
    )


STATIC = (RecipeStep(kind="quantize", params={"mode": "static"}),)
FP16 = (RecipeStep(kind="quantize", params={"mode": "fp16"}),)


def test_a_re_release_job_reuses_the_classes_static_int8_artifact(tmp_path: Path) -> None:
    source = tmp_path / "v1.onnx"
    source.write_bytes(classifier())
    int8 = tmp_path / "v1.int8.onnx"
    quantize_onnx(source, int8, Quantize(mode="static"), calibration=inputs(), progress=False)
    fp16 = tmp_path / "v1.fp16.onnx"
    quantize_onnx(source, fp16, Quantize(mode="fp16"), calibration=None, progress=False)

    async def body() -> None:
        async with running_controller(tmp_path, **POOL) as c:
            await c.add_model("clf", source.read_bytes())
            engine = make_engine(c.config.database_url)
            store, blobs = SqlStore(engine), BlobStore(c.config.blob_dir)
            try:
                assert previous_static_int8(store, blobs, "clf", "home-hub") is None
                record(store, blobs, int8, 1, STATIC)
                record(store, blobs, fp16, 2, FP16)  # newer, but not static int8
                found = previous_static_int8(store, blobs, "clf", "home-hub")
                assert found is not None and sha256_file(found) == sha256_file(int8)
                assert previous_static_int8(store, blobs, "clf", "camera") is None
            finally:
                engine.dispose()

            v2 = await c.add_model("clf", fine_tuned(source.read_bytes()))
            assert v2.version == 2
            job = await start(c)
            final = (await follow(c, job.id))[-1]
            assert final.state == pb.COMPRESSION_JOB_STATE_SUCCEEDED, final.error
            assert final.trials[1].recipe.startswith("quantize.reuse(")
            assert final.artifact_id == "clf/home-hub/v3"

            listed = await c.admin.ListArtifacts(pb.ListArtifactsRequest(), timeout=10)
            artifact = next(a for a in listed.artifacts if a.id == final.artifact_id)
            manifest = Manifest.from_json_bytes(artifact.manifest.manifest_json)
            assert manifest.model_version == 2
            assert [s.kind for s in manifest.recipe] == ["quantize.reuse"]
            assert manifest.recipe[0].params["previous_sha256"] == sha256_file(int8)

    run(body())
