"""AdminService over real gRPC on loopback: each RPC, and each bad input changing nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from artifact.manifest import Manifest
from artifact.signing import TrustedKey
from controller.cli.client import AdminClient, create_channel
from controller.db import make_engine
from controller.records import ClassCount
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import (
    Harness,
    expect_status,
    onnx_model,
    run,
    running_controller,
    sha256,
)
from tests.controller.test_onnx_inspect import custom_op_model

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def test_add_model_stores_blob_row_and_event(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data = onnx_model(width=6)
            model = await c.add_model("motions", data, description="BasicMotions CNN")
            assert (model.name, model.version, model.sha256) == ("motions", 1, sha256(data))
            assert model.size_bytes == len(data) and model.description == "BasicMotions CNN"
            assert [(s.name, s.dtype, list(s.shape)) for s in model.inputs] == [
                ("x", "float32", [-1, 6])
            ]
            assert model.created_unix_ms > 0
            digest = sha256(data)
            assert c.blob_files() == [f"sha256/{digest[:2]}/{digest}"]
            (event,) = await c.events("model.")
            assert event.kind == "model.added" and event.subject == "motions"
            assert json.loads(event.detail_json)["version"] == 1

            # the same bytes again: the same version; new bytes: the next one
            again = await c.add_model("motions", data)
            assert again.version == 1 and again.created_unix_ms == model.created_unix_ms
            second = await c.add_model("motions", onnx_model(width=6, seed=1))
            assert second.version == 2
            # v1's bytes again (say, to repair a corrupt stored copy): still v1, no v3
            earlier = await c.add_model("motions", data)
            assert earlier.version == 1 and earlier.created_unix_ms == model.created_unix_ms
            listed = await c.admin.ListModels(pb.ListModelsRequest(), timeout=10)
            assert [(m.name, m.version) for m in listed.models] == [("motions", 1), ("motions", 2)]
            assert listed.next_page_token == ""
            assert c.counts()["models"] == 2
            # one version a page: the token carries (name, version)
            first = await c.admin.ListModels(pb.ListModelsRequest(page_size=1), timeout=10)
            assert [m.version for m in first.models] == [1] and first.next_page_token
            rest = await c.admin.ListModels(
                pb.ListModelsRequest(page_token=first.next_page_token), timeout=10
            )
            assert [m.version for m in rest.models] == [2] and rest.next_page_token == ""
            await expect_status(
                c.admin.ListModels(pb.ListModelsRequest(page_token="%%%"), timeout=10),
                INVALID,
                "next_page_token",
            )

    run(body())


def refusal_through_cli_client(c: Harness, name: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """AddModel as `homefleet model add` sends it, which must fail: its code and details."""
    header = pb.AddModelHeader(name=name, size_bytes=len(data), sha256=sha256(data))
    chunks = [pb.AddModelChunk(header=header)] + [
        pb.AddModelChunk(data=data[i : i + 65536]) for i in range(0, len(data), 65536)
    ]
    with create_channel(c.server.address) as channel:
        client = AdminClient(channel, address=c.server.address, timeout_s=10)
        try:
            client.add_model(iter(chunks), size_bytes=len(data))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    raise AssertionError("the upload succeeded")


def test_add_model_bad_input_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_model_bytes=200_000) as c:
            good = onnx_model()
            before = c.snapshot()
            header = pb.AddModelHeader(name="motions", size_bytes=len(good))

            async def refused(call: object, code: grpc.StatusCode, *fragments: str) -> None:
                await expect_status(call, code, *fragments)  # type: ignore[arg-type]
                assert c.snapshot() == before

            # data before the header
            await refused(
                c.admin.AddModel(iter([pb.AddModelChunk(data=good)]), timeout=10),
                INVALID,
                "first AddModel message must carry the header",
            )
            # no message at all
            await refused(c.admin.AddModel(iter([]), timeout=10), INVALID, "header")
            # a second header
            await refused(
                c.admin.AddModel(
                    iter([pb.AddModelChunk(header=header), pb.AddModelChunk(header=header)]),
                    timeout=10,
                ),
                INVALID,
                "only the first AddModel message may carry a header",
            )
            await refused(c.add_model("Bad Name!", good), INVALID, "name", "lowercase")
            await refused(c.add_model("m", good, size_bytes=0), INVALID, "size_bytes")
            # refused by its header while the client still writes: through the CLI's
            # (sync) client, as operators upload. grpc's aio client can turn that race
            # into INTERNAL "Internal error from Core" (grpc/grpc#36066).
            code, details = await asyncio.to_thread(
                refusal_through_cli_client, c, "big", onnx_model(weights=60_000)
            )
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "at most 200000 bytes" in details
            assert c.snapshot() == before
            await refused(
                c.add_model("short", good, size_bytes=len(good) + 10),
                INVALID,
                f"received {len(good)} bytes but the header announced {len(good) + 10}",
            )
            await refused(
                c.add_model("long", good, size_bytes=len(good) - 10),
                INVALID,
                "received more than",
            )
            await refused(
                c.add_model("tampered", good, digest=sha256(b"something else")),
                INVALID,
                "sha256",
                "corrupted in transit",
            )
            await refused(c.add_model("m", good, digest="not-a-digest"), INVALID, "sha256")
            await refused(
                c.add_model("garbage", b"definitely not onnx" * 100),
                INVALID,
                "model is not a valid ONNX file",
            )
            await refused(
                c.add_model("custom", custom_op_model()), INVALID, "onnxruntime", "cannot load it"
            )
            await refused(c.add_model("m", good, description="x" * 5000), INVALID, "description")
            assert await c.events() == []

    run(body())


def published_key(c: Harness) -> TrustedKey:
    info = json.loads(c.config.info_path.read_text())
    return TrustedKey.from_pem(Path(info["public_key_path"]).read_bytes())


def test_create_artifact_signs_a_complete_manifest(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data = onnx_model()
            await c.add_model("motions", data)
            art = await c.artifact("motions", "home-hub")
            assert (art.id, art.version, art.sha256) == ("motions/home-hub/v1", 1, sha256(data))
            key = published_key(c)
            key.verify(art.manifest.manifest_json, art.manifest.signature)
            assert art.manifest.key_id == key.key_id
            manifest = Manifest.from_json_bytes(art.manifest.manifest_json)
            assert manifest.artifact_id == art.id
            assert (manifest.model_name, manifest.model_version) == ("motions", 1)
            assert manifest.sha256 == sha256(data) and manifest.size_bytes == len(data)
            assert [s.kind for s in manifest.recipe] == ["identity"]
            assert manifest.metrics == {"size_bytes": float(len(data))}
            assert (manifest.expires_at - manifest.created_at).days == 365
            assert [s.name for s in manifest.inputs] == ["x"]

            second = await c.artifact("motions", "home-hub", expires_in_days=7)
            assert second.id == "motions/home-hub/v2"
            other = await c.artifact("motions", "speaker")
            assert other.id == "motions/speaker/v1"
            await c.add_model("motions", onnx_model(seed=3))
            pinned = await c.artifact("motions", "speaker", model_version=1)
            assert Manifest.from_json_bytes(pinned.manifest.manifest_json).model_version == 1

            listed = await c.admin.ListArtifacts(
                pb.ListArtifactsRequest(device_class="home-hub"), timeout=10
            )
            assert [a.id for a in listed.artifacts] == [
                "motions/home-hub/v1",
                "motions/home-hub/v2",
            ]
            everything = await c.admin.ListArtifacts(pb.ListArtifactsRequest(), timeout=10)
            assert len(everything.artifacts) == 4
            assert len(await c.events("artifact.created")) == 4

    run(body())


def test_create_artifact_bad_input_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.add_model("motions", onnx_model())
            before = c.snapshot()
            await expect_status(c.artifact("ghost"), NOT_FOUND, "model 'ghost'", "not registered")
            await expect_status(c.artifact("motions", model_version=9), NOT_FOUND, "version 9")
            await expect_status(c.artifact("motions", "Home Hub"), INVALID, "device_class")
            await expect_status(c.artifact("motions", ""), INVALID, "device_class")
            await expect_status(
                c.artifact("motions", expires_in_days=5000), INVALID, "expires_in_days"
            )
            await expect_status(
                c.admin.ListArtifacts(pb.ListArtifactsRequest(model_name="NO!"), timeout=10),
                INVALID,
                "model_name",
            )
            assert c.snapshot() == before

    run(body())


def test_assign_rules_and_bad_input(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.add_model("motions", onnx_model())
            hub_art = await c.artifact("motions", "home-hub")
            await c.artifact("motions", "speaker")
            await c.register("hub-1")
            await c.register("hub-2")
            await c.register("spk-1", "speaker")
            before = c.snapshot()

            async def assign(**fields: str) -> pb.AssignResponse:
                response: pb.AssignResponse = await c.admin.Assign(
                    pb.AssignRequest(**fields), timeout=10
                )
                return response

            await expect_status(
                assign(artifact_id="motions/home-hub/v9", device_class="home-hub"),
                NOT_FOUND,
                "motions/home-hub/v9",
            )
            await expect_status(
                assign(artifact_id=hub_art.id), INVALID, "device_class or device_id"
            )
            await expect_status(assign(device_class="home-hub"), INVALID, "artifact_id")
            await expect_status(
                assign(artifact_id=hub_art.id, device_class="speaker"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "built for device class 'home-hub'",
            )
            await expect_status(
                assign(artifact_id=hub_art.id, device_id="ghost"), NOT_FOUND, "'ghost'"
            )
            await expect_status(
                assign(artifact_id=hub_art.id, device_id="spk-1"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "class 'speaker'",
            )
            await expect_status(
                assign(artifact_id=hub_art.id, device_id="Bad Id"), INVALID, "device_id"
            )
            assert c.snapshot() == before

            assert (
                await assign(artifact_id=hub_art.id, device_class="home-hub")
            ).devices_affected == 2
            assert (await assign(artifact_id=hub_art.id, device_id="hub-1")).devices_affected == 1
            assert c.counts()["assignments"] == 2
            (changed, _) = await c.events("assignment.changed")
            assert json.loads(changed.detail_json)["devices_affected"] == 2

    run(body())


async def pages_of(
    call: Callable[..., Awaitable[Any]], request: Any, ids: Callable[[Any], list[str]]
) -> list[list[str]]:
    """The ids of every page of a paged listing, following next_page_token to the end."""
    pages = []
    while True:
        reply = await call(request, timeout=10)
        pages.append(ids(reply))
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token


def test_list_devices_pages_through_the_fleet(tmp_path: Path, database_url: str | None) -> None:
    """Pages in id order, none repeated or skipped; tokens keep the class filter they were
    issued with; a bad token or page size is INVALID_ARGUMENT (on SQLite and PostgreSQL)."""
    extra = {"db_url": database_url} if database_url else {}

    async def body() -> None:
        async with running_controller(tmp_path, **extra) as c:
            for i in range(7):
                await c.register(f"dev-{i:02d}", "camera" if i % 2 else "home-hub")

            async def walk(page_size: int, device_class: str = "") -> list[list[str]]:
                return await pages_of(
                    c.admin.ListDevices,
                    pb.ListDevicesRequest(device_class=device_class, page_size=page_size),
                    lambda reply: [d.device_id for d in reply.devices],
                )

            everyone = [f"dev-{i:02d}" for i in range(7)]
            assert await walk(3) == [everyone[:3], everyone[3:6], everyone[6:]]
            assert await walk(7) == [everyone]  # a full last page has no empty successor
            assert await walk(0) == [everyone]  # 0: the default page size
            assert await walk(2, "camera") == [["dev-01", "dev-03"], ["dev-05"]]

            first = await c.admin.ListDevices(
                pb.ListDevicesRequest(device_class="camera", page_size=1), timeout=10
            )
            for request, fragment in (
                (pb.ListDevicesRequest(page_token=first.next_page_token), "issued for the filter"),
                (pb.ListDevicesRequest(page_token="not-a-token"), "next_page_token"),
                (pb.ListDevicesRequest(page_token="W10"), "next_page_token"),  # "[]"
                (pb.ListDevicesRequest(page_size=10_001), "page_size must be in 0..10000"),
            ):
                await expect_status(c.admin.ListDevices(request, timeout=10), INVALID, fragment)
            # The rejected calls changed nothing: the camera listing carries on.
            rest = await c.admin.ListDevices(
                pb.ListDevicesRequest(device_class="camera", page_token=first.next_page_token),
                timeout=10,
            )
            assert [d.device_id for d in rest.devices] == ["dev-03", "dev-05"]
            assert rest.next_page_token == ""
            # The per-class counts the dashboard shows are over the whole fleet, in SQL.
            engine = make_engine(c.config.database_url)
            try:
                counts = SqlStore(engine).count_devices()
            finally:
                engine.dispose()
            assert counts == [ClassCount("camera", 3, 0), ClassCount("home-hub", 4, 0)]

    run(body())


def test_list_artifacts_pages_and_keeps_its_filter(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.add_model("motions", onnx_model())
            made = [await c.artifact("motions", cls) for cls in ["home-hub"] * 3 + ["camera"]]

            async def walk(page_size: int, device_class: str = "") -> list[list[str]]:
                return await pages_of(
                    c.admin.ListArtifacts,
                    pb.ListArtifactsRequest(device_class=device_class, page_size=page_size),
                    lambda reply: [a.id for a in reply.artifacts],
                )

            hubs = [a.id for a in made[:3]]
            assert await walk(2) == [[made[3].id, hubs[0]], hubs[1:]]  # camera sorts first
            assert await walk(2, "home-hub") == [hubs[:2], hubs[2:]]
            first = await c.admin.ListArtifacts(
                pb.ListArtifactsRequest(device_class="home-hub", page_size=1), timeout=10
            )
            await expect_status(
                c.admin.ListArtifacts(
                    pb.ListArtifactsRequest(
                        device_class="camera", page_token=first.next_page_token
                    ),
                    timeout=10,
                ),
                INVALID,
                "issued for the filter",
            )
            await expect_status(
                c.admin.ListArtifacts(  # a device listing's token: [1, "", ["hub-1"]]
                    pb.ListArtifactsRequest(page_token="WzEsIiIsWyJodWItMSJdXQ"), timeout=10
                ),
                INVALID,
                "next_page_token",
            )

    run(body())


def test_list_devices_and_events(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data = onnx_model()
            await c.add_model("motions", data)
            art = await c.artifact("motions", "home-hub")
            await c.register("hub-1", hardware=pb.HardwareInfo(arch="aarch64", cpu_cores=2))
            await c.register("spk-1", "speaker")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10
            )
            await c.agent.ReportStatus(
                pb.StatusReport(
                    device_id="hub-1",
                    model_name="motions",
                    artifact_sha256=art.sha256,
                    outcome=pb.DEPLOYMENT_OUTCOME_ACTIVE,
                    reason="self-test passed",
                    bytes_received=len(data),
                    encoding=pb.PAYLOAD_ENCODING_FULL,
                    serving_sha256=art.sha256,
                ),
                timeout=10,
            )
            hubs = await c.admin.ListDevices(
                pb.ListDevicesRequest(device_class="home-hub"), timeout=10
            )
            (hub,) = hubs.devices
            assert (hub.device_id, hub.device_class, hub.hardware.arch) == (
                "hub-1",
                "home-hub",
                "aarch64",
            )
            assert hub.status == pb.DEVICE_STATUS_OFFLINE and hub.last_seen_unix_ms > 0
            (state,) = hub.models
            assert (state.model_name, state.desired_artifact_id, state.serving_artifact_id) == (
                "motions",
                art.id,
                art.id,
            )
            assert (state.desired_sha256, state.serving_sha256) == (art.sha256, art.sha256)
            assert state.last_outcome == pb.DEPLOYMENT_OUTCOME_ACTIVE
            assert (state.last_reason, state.bytes_received) == ("self-test passed", len(data))
            assert state.encoding == pb.PAYLOAD_ENCODING_FULL
            everyone = await c.admin.ListDevices(pb.ListDevicesRequest(), timeout=10)
            assert [d.device_id for d in everyone.devices] == ["hub-1", "spk-1"]
            await expect_status(
                c.admin.ListDevices(pb.ListDevicesRequest(device_class="Bad Class"), timeout=10),
                INVALID,
                "device_class",
            )

            kinds = [e.kind for e in await c.events()]
            assert kinds == [
                "model.added",
                "artifact.created",
                "device.registered",
                "device.registered",
                "assignment.changed",
                "device.status",
            ]
            status_event = (await c.events("device.status"))[0]
            assert "self-test passed" in status_event.message
            page = await c.admin.ListEvents(pb.ListEventsRequest(limit=2), timeout=10)
            assert [e.kind for e in page.events] == kinds[:2] and page.more
            rest = await c.admin.ListEvents(
                pb.ListEventsRequest(after_id=page.events[-1].id), timeout=10
            )
            assert [e.kind for e in rest.events] == kinds[2:] and not rest.more
            # the newest ones, still oldest first; older ones exist
            latest = await c.admin.ListEvents(
                pb.ListEventsRequest(limit=2, newest=True), timeout=10
            )
            assert [e.kind for e in latest.events] == kinds[-2:] and latest.more
            whole = await c.admin.ListEvents(pb.ListEventsRequest(newest=True), timeout=10)
            assert [e.kind for e in whole.events] == kinds and not whole.more
            devices = await c.admin.ListEvents(
                pb.ListEventsRequest(kind_prefix="device."), timeout=10
            )
            assert len(devices.events) == 3
            await expect_status(
                c.admin.ListEvents(pb.ListEventsRequest(limit=1001), timeout=10),
                INVALID,
                "limit must be in 0..1000",
            )

    run(body())


def test_assigning_an_older_artifact_re_releases_it_under_a_new_signed_version(
    tmp_path: Path,
) -> None:
    """Agents refuse versions older than one they ran, so a rollback is a re-release."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            first_model = await c.add_model("motions", onnx_model(seed=1))
            first = await c.artifact("motions", "home-hub", model_version=first_model.version)
            second_model = await c.add_model("motions", onnx_model(seed=2))
            second = await c.artifact("motions", "home-hub", model_version=second_model.version)
            await c.admin.Assign(pb.AssignRequest(artifact_id=second.id, device_class="home-hub"))

            # roll back
            await c.admin.Assign(pb.AssignRequest(artifact_id=first.id, device_class="home-hub"))
            listed = await c.admin.ListArtifacts(pb.ListArtifactsRequest(model_name="motions"))
            by_version = {a.version: a for a in listed.artifacts}
            assert sorted(by_version) == [1, 2, 3]
            again = by_version[3]
            assert again.sha256 == first.sha256 and again.size_bytes == first.size_bytes
            manifest = Manifest.from_json_bytes(again.manifest.manifest_json)
            assert (manifest.version, manifest.rereleases) == (3, first.id)
            assert manifest.recipe == Manifest.from_json_bytes(first.manifest.manifest_json).recipe
            published_key(c).verify(again.manifest.manifest_json, again.manifest.signature)

            # twice: no second re-release
            await c.admin.Assign(pb.AssignRequest(artifact_id=first.id, device_class="home-hub"))
            listed = await c.admin.ListArtifacts(pb.ListArtifactsRequest(model_name="motions"))
            assert len(listed.artifacts) == 3

    run(body())
