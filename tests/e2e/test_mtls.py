"""Mutual TLS end to end, with real processes: `controller serve --tls`, `agent run --tls`
and the operator CLI with `HOMEFLEET_TLS`, certificates from `homefleet certs`.

Who a client is comes from its certificate: a device may act only as itself, only an
admin certificate reaches AdminService, and a client without a certificate the CA
signed (none, another CA's, an expired one, plaintext) does not get past the handshake.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from artifact.tls import CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, Role, TlsBundle
from protos import fleet_pb2, fleet_pb2_grpc
from tests.support.pki import Pki, make_pki

from .harness import (
    CHANNEL_OPTIONS,
    ROOT,
    Agent,
    Controller,
    linear_model,
    reference_output,
    wait_for,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def controller(tmp_path: Path, pki: Pki) -> Iterator[Controller]:
    ctl = Controller(
        tmp_path / "controller", tls=pki.controller(), admin_tls=pki.admin("alice")
    ).start()
    try:
        yield ctl
    finally:
        assert ctl.stop() == 0, ctl.process.log()


def homefleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The `homefleet` command in a fresh process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "homefleet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def channel_as(address: str, tls_dir: Path | None) -> grpc.Channel:
    if tls_dir is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = TlsBundle.load(tls_dir).channel_credentials()
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def unchecked_channel(address: str, server_ca: Path, tls_dir: Path) -> grpc.Channel:
    """Dial with whatever certificate ``tls_dir`` holds: what the server must judge alone
    (TlsBundle.load would refuse it on the client already)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(server_ca / CA_FILE).read_bytes(),
        private_key=(tls_dir / KEY_FILE).read_bytes(),
        certificate_chain=(tls_dir / CERT_FILE).read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def register(address: str, tls_dir: Path | None, device_id: str) -> None:
    with channel_as(address, tls_dir) as channel:
        register_on(channel, device_id)


def register_on(channel: grpc.Channel, device_id: str) -> None:
    fleet_pb2_grpc.AgentServiceStub(channel).Register(
        fleet_pb2.RegisterRequest(
            device_id=device_id,
            device_class="home-hub",
            hardware=fleet_pb2.HardwareInfo(arch="x86_64", cpu_cores=2),
        ),
        timeout=10,
    )


def list_devices(address: str, tls_dir: Path | None) -> list[str]:
    with channel_as(address, tls_dir) as channel:
        response = fleet_pb2_grpc.AdminServiceStub(channel).ListDevices(
            fleet_pb2.ListDevicesRequest(), timeout=10
        )
    return [d.device_id for d in response.devices]


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    assert isinstance(call, grpc.RpcError) and isinstance(call, grpc.Call)
    return call.code(), call.details() or ""


def test_an_agent_with_its_certificate_deploys_and_serves(
    tmp_path: Path, pki: Pki, controller: Controller
) -> None:
    hub = Agent(
        "hub-1",
        "home-hub",
        tmp_path / "agents" / "hub-1",
        controller.address,
        controller.public_key,
        tls=pki.device("hub-1"),
    ).start()
    try:
        model = linear_model(tmp_path / "v1.onnx", seed=1)
        artifact = controller.release("motion", model, "home-hub")
        controller.wait_serving("hub-1", "motion", artifact.sha256)
        x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
        y, sha = hub.predict("motion", x)
        assert sha == artifact.sha256
        np.testing.assert_allclose(y, reference_output(model, x), rtol=1e-5)
    finally:
        assert hub.stop() == 0, hub.process.log()


def test_a_device_certificate_acts_only_as_its_own_device(pki: Pki, controller: Controller) -> None:
    hub_1 = pki.device("hub-1")
    register(controller.address, hub_1, "hub-1")
    with pytest.raises(grpc.RpcError) as impersonation:
        register(controller.address, hub_1, "hub-2")
    code, details = status_of(impersonation.value)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "device 'hub-1'" in details and "'hub-2'" in details
    with pytest.raises(grpc.RpcError) as admin_call:
        list_devices(controller.address, hub_1)
    code, details = status_of(admin_call.value)
    assert code is grpc.StatusCode.PERMISSION_DENIED and "admin certificate" in details
    assert list_devices(controller.address, pki.admin("alice")) == ["hub-1"]  # no hub-2


def test_a_device_certificate_registers_only_in_its_class(pki: Pki, controller: Controller) -> None:
    camera_1 = pki.device("camera-1", device_class="camera")
    with channel_as(controller.address, camera_1) as channel, pytest.raises(grpc.RpcError) as call:
        fleet_pb2_grpc.AgentServiceStub(channel).Register(
            fleet_pb2.RegisterRequest(
                device_id="camera-1",
                device_class="home-hub",  # where the models it wants would be
                hardware=fleet_pb2.HardwareInfo(arch="x86_64", cpu_cores=2),
            ),
            timeout=10,
        )
    code, details = status_of(call.value)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "for class 'camera'" in details and "class 'home-hub'" in details
    assert list_devices(controller.address, pki.admin("alice")) == []


def test_an_admin_certificate_cannot_act_as_a_device(pki: Pki, controller: Controller) -> None:
    with pytest.raises(grpc.RpcError) as call:
        register(controller.address, pki.admin("alice"), "alice")
    code, details = status_of(call.value)
    assert code is grpc.StatusCode.PERMISSION_DENIED and "device certificate" in details
    assert list_devices(controller.address, pki.admin("alice")) == []


def test_clients_without_a_valid_certificate_do_not_get_past_the_handshake(
    tmp_path: Path, pki: Pki, controller: Controller
) -> None:
    with pytest.raises(grpc.RpcError) as call:
        register(controller.address, None, "hub-1")  # plaintext
    assert status_of(call.value)[0] is grpc.StatusCode.UNAVAILABLE
    other_ca = make_pki(tmp_path / "other").device("hub-1")
    for label, tls_dir in (
        ("another CA's certificate", other_ca),
        ("an expired certificate", pki.expired_device("hub-1")),
    ):
        with (
            unchecked_channel(controller.address, pki.ca_dir, tls_dir) as channel,
            pytest.raises(grpc.RpcError) as call,
        ):
            register_on(channel, "hub-1")
        assert status_of(call.value)[0] is grpc.StatusCode.UNAVAILABLE, label
    # a TLS client that presents no certificate at all
    anonymous = grpc.ssl_channel_credentials(root_certificates=TlsBundle.load(pki.admin()).ca_pem)
    with (
        grpc.secure_channel(controller.address, anonymous) as channel,
        pytest.raises(grpc.RpcError) as call,
    ):
        fleet_pb2_grpc.AdminServiceStub(channel).ListDevices(
            fleet_pb2.ListDevicesRequest(), timeout=10
        )
    assert status_of(call.value)[0] is grpc.StatusCode.UNAVAILABLE
    assert list_devices(controller.address, pki.admin("alice")) == []


def test_the_operator_cli_uses_the_admin_certificate_in_homefleet_tls(
    pki: Pki, controller: Controller
) -> None:
    register(controller.address, pki.device("hub-1"), "hub-1")
    listed = controller.cli("devices", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"hub-1"' in listed.stdout
    no_tls = Controller(controller.data_dir)  # the same address, no admin certificate
    no_tls.address = controller.address
    refused = no_tls.cli("devices")
    assert refused.returncode == 4
    assert "HOMEFLEET_TLS" in refused.stderr
    wrong_role = Controller(controller.data_dir, admin_tls=pki.device("hub-1"))
    wrong_role.address = controller.address
    usage = wrong_role.cli("devices")
    assert usage.returncode == 2
    assert "is a device certificate" in usage.stderr and "needs an admin one" in usage.stderr
    # a name the controller's certificate does not carry: said so, not "is it running?"
    misnamed = Controller(controller.data_dir, admin_tls=pki.admin("alice"))
    misnamed.address = controller.address.replace("127.0.0.1", "localhost")
    wrong_host = misnamed.cli("devices")
    assert wrong_host.returncode == 4
    assert "certificate that does not name that host" in wrong_host.stderr
    shown = homefleet("certs", "show", str(pki.controller()))
    assert shown.returncode == 0 and "127.0.0.1" in shown.stdout and "hosts" in shown.stdout


def test_an_agent_refuses_to_start_with_another_devices_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    done = homefleet(
        "agent", "run", "--device-id", "hub-2", "--device-class", "home-hub",
        "--state-dir", str(tmp_path / "state"), "--tls", str(pki.device("hub-1")),
    )  # fmt: skip
    assert done.returncode == 2
    assert "holds device 'hub-1''s certificate" in done.stderr
    assert "--device-id 'hub-2'" in done.stderr
    other_class = homefleet(
        "agent", "run", "--device-id", "hub-1", "--device-class", "camera",
        "--state-dir", str(tmp_path / "state"), "--tls", str(pki.device("hub-1")),
    )  # fmt: skip
    assert other_class.returncode == 2
    assert "certificate for class 'home-hub'" in other_class.stderr
    assert not (tmp_path / "state").exists()


def test_the_controller_refuses_plaintext_beyond_loopback_and_a_wrong_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return homefleet("controller", "serve", "--port", "0", *args)

    exposed = serve("--data-dir", str(tmp_path / "a"), "--host", "0.0.0.0")
    assert exposed.returncode == 2
    assert "without TLS" in exposed.stderr and "--insecure" in exposed.stderr
    device_cert = serve("--data-dir", str(tmp_path / "b"), "--tls", str(pki.device("hub-1")))
    assert device_cert.returncode == 2  # a configuration error: systemd does not restart it
    assert "is a device certificate" in device_cert.stderr
    assert "needs a controller one" in device_cert.stderr


def test_a_revoked_device_is_refused_without_a_controller_restart(
    pki: Pki, controller: Controller
) -> None:
    register(controller.address, pki.device("hub-1"), "hub-1")
    crl = pki.controller() / CRL_FILE
    revoked = homefleet(
        "certs", "revoke", str(pki.device("hub-1")), "--ca", str(pki.ca_dir), "--crl", str(crl)
    )
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith("revoked serial ") and "lists 1 certificate(s)" in (
        revoked.stdout
    )
    again = homefleet(
        "certs", "revoke", str(pki.device("hub-1")), "--ca", str(pki.ca_dir), "--crl", str(crl)
    )
    assert again.returncode == 0, again.stderr
    assert "was already revoked (the list is signed again" in again.stdout  # not news
    assert "lists 1 certificate(s)" in again.stdout

    def refused() -> str | None:
        try:
            register(controller.address, pki.device("hub-1"), "hub-1")
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            assert code is grpc.StatusCode.PERMISSION_DENIED, details
            return details
        return None

    assert "was revoked" in wait_for("the controller to read crl.pem", refused)
    register(controller.address, pki.device("hub-2"), "hub-2")  # others are unaffected


def test_a_revocation_list_from_another_ca_stops_the_controller_at_start(
    tmp_path: Path, pki: Pki
) -> None:
    other = make_pki(tmp_path / "other")
    other.ca().revoke(1, pki.controller() / CRL_FILE)  # crl.pem signed by the wrong CA
    done = homefleet(
        "controller", "serve", "--port", "0",
        "--data-dir", str(tmp_path / "data"), "--tls", str(pki.controller()),
    )  # fmt: skip
    assert done.returncode == 2  # a configuration error: systemd does not restart it
    assert "crl.pem is not signed by the CA this controller trusts" in done.stderr


def registrations(controller: Controller, device_id: str) -> int:
    return sum(
        1
        for e in controller.events("device.registered")
        if json.loads(e.detail_json)["device_id"] == device_id
    )


def registered_agent(tmp_path: Path, controller: Controller, tls: Path) -> Agent:
    """Agent process hub-1 (home-hub) dialing with ``tls``, once it has registered."""
    hub = Agent(
        "hub-1", "home-hub", tmp_path / "agents" / "hub-1", controller.address, tls=tls
    ).start()
    wait_for("hub-1 to register", lambda: registrations(controller, "hub-1") or None)
    return hub


def test_a_renewed_certificate_is_used_at_the_next_connection_without_a_restart(
    tmp_path: Path, pki: Pki, controller: Controller
) -> None:
    tls = pki.device("hub-1")
    hub = registered_agent(tmp_path, controller, tls)
    try:
        old = TlsBundle.load(tls).identity.serial
        # renewed in place
        pki.ca().issue(tls, "hub-1", Role.DEVICE, device_class="home-hub", replace=True)
        pki.ca().revoke(old, pki.controller() / CRL_FILE)  # and the old one cut off
        before = registrations(controller, "hub-1")
        assert controller.stop() == 0, controller.process.log()
        controller.start()  # the agent's connection dropped; it dials again, same port
        wait_for(
            "hub-1 to register again with its renewed certificate",
            lambda: registrations(controller, "hub-1") > before or None,
        )
        assert hub.process.alive()
    finally:
        assert hub.stop() == 0, hub.process.log()


def test_health_checks_need_a_certificate_that_is_not_revoked(
    pki: Pki, controller: Controller
) -> None:
    """Health is open to any role the CA issued, but a revoked certificate is refused."""
    request = health_pb2.HealthCheckRequest(service="")
    for tls in (pki.device("hub-1"), pki.admin()):
        with channel_as(controller.address, tls) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    serial = TlsBundle.load(pki.device("hub-1")).identity.serial
    pki.ca().revoke(serial, pki.controller() / CRL_FILE)

    def refused() -> str | None:
        with channel_as(controller.address, pki.device("hub-1")) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
            except grpc.RpcError as exc:
                code, details = status_of(exc)
                assert code is grpc.StatusCode.PERMISSION_DENIED, details
                return details
        return None

    assert "was revoked" in wait_for("the controller to read crl.pem", refused)


def test_revocation_ends_a_watch_stream_that_is_already_open(
    tmp_path: Path, pki: Pki, controller: Controller
) -> None:
    tls = pki.device("hub-1")
    hub = registered_agent(tmp_path, controller, tls)
    try:
        serial = TlsBundle.load(tls).identity.serial
        pki.ca().revoke(serial, pki.controller() / CRL_FILE)
        wait_for(
            "the open stream to end and the agent to be refused",
            lambda: "was revoked" in hub.process.log() or None,
        )
    finally:
        assert hub.stop() == 0, hub.process.log()


def test_reflection_is_off_under_mutual_tls(pki: Pki, controller: Controller) -> None:
    """Reflection is no AgentService or AdminService call: no access check would guard it."""
    with channel_as(controller.address, pki.device("hub-1")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as call:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert status_of(call.value)[0] is grpc.StatusCode.UNIMPLEMENTED
