"""TLS, mutual TLS and bearer tokens, on real daemons.

One cloud (mutual TLS + tokens from a file) and one edge (TLS + tokens from an environment variable,
talking to the cloud with a client certificate and a token) run as processes for the module; both
configs name their files relative to the YAML. A throwaway PKI (tests/support/pki.py) provides a CA, the
server certificate, a client certificate and a rogue client certificate from another CA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cleave_cli.client import EdgeClient, outputs_of
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from cleave_cli.main import main as cleave
from cloud_node.config import CloudConfig
from edge_node.cloud_link import CloudLink
from edge_node.config import EdgeConfig, Reconnect
from edge_node.link import LinkMonitor
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from protos.cleave.v1 import edge_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from runtime.security import ClientAuth, ClientTLS, ServerAuth, ServerTLS
from runtime.serving import Daemon, open_channel
from runtime.settings import SettingsError
from tests.support import ROOT
from tests.support.pki import Pki, make_pki

pytestmark = [pytest.mark.integration]

MODEL = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
CUT = 3  # after the ReLU: the head runs here, the tail in the cloud
CLOUD_TOKEN = "cloud-token-3f9c2a"  # what the edge sends to the cloud
EDGE_TOKENS = ("edge-token-a17b", "edge-token-second")  # what local apps send to the edge
EDGE_ENV = "CLEAVE_TEST_EDGE_TOKENS"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure")


@pytest.fixture(scope="module")
def pki(home: Path) -> Pki:
    return make_pki(home / "pki")


def client_tls(pki: Pki, cert: bool = True) -> ClientTLS:
    if not cert:
        return ClientTLS(ca=str(pki.ca))
    return ClientTLS(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))


@pytest.fixture(scope="module")
def cloud(home: Path, pki: Pki) -> Iterator[DaemonProcess]:
    (home / "cloud.tokens").write_text(f"# tokens of the edges\n{CLOUD_TOKEN}\n\nretired-but-listed\n")
    config = {
        "models": [MODEL],
        "torch_threads": 1,
        # Relative to the YAML file, not to the daemon's working directory.
        "tls": {"cert": "pki/server.crt", "key": "pki/server.key", "ca": "pki/ca.crt", "require_client_cert": True},
        "auth": {"tokens_file": "cloud.tokens"},
    }
    (home / "cloud.yaml").write_text(yaml.safe_dump(config))
    proc = cloud_process(home / "cloud.yaml", free_port(), home / "cloud.log", tls=client_tls(pki))
    yield proc.start()
    proc.stop()


@pytest.fixture(scope="module")
def edge(home: Path, pki: Pki, cloud: DaemonProcess) -> Iterator[DaemonProcess]:
    (home / "to-cloud.token").write_text(CLOUD_TOKEN + "\n")
    config = {
        "model": MODEL,
        "torch_threads": 1,
        "plan": {"cut": str(CUT), "encoding": "int8"},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5, "connect_timeout_s": 3.0},
        "tls": {"cert": "pki/server.crt", "key": "pki/server.key"},
        "auth": {"tokens_env": EDGE_ENV},
        "cloud_tls": {"ca": "pki/ca.crt", "cert": "pki/client.crt", "key": "pki/client.key"},
        "cloud_auth": {"token_file": "to-cloud.token"},
    }
    (home / "edge.yaml").write_text(yaml.safe_dump(config))
    env = {EDGE_ENV: ",".join(EDGE_TOKENS)}
    proc = edge_process(
        home / "edge.yaml", free_port(), cloud.port, home / "edge.log", tls=client_tls(pki, False), env=env
    )
    yield proc.start()
    proc.stop()


def get_info(address: str, **security) -> str:
    """Call the cloud's GetInfo; the model's name, or the status code's name when refused."""
    with open_channel(address, **security) as channel:
        try:
            info = si_grpc.SplitInferenceStub(channel).GetInfo(si_pb2.GetInfoRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return info.models[0].name


def edge_status(address: str, **security) -> edge_pb2.EdgeStatus | str:
    client = EdgeClient(address, **security)
    try:
        return client.status(timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        client.close()


# -- settings, no server ----------------------------------------------------------------------------


def test_token_sources_add_up_and_never_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tokens").write_text("# comment\n  file-token  \n\n")
    monkeypatch.setenv("TOKENS_UNDER_TEST", "env-1, env-2")
    auth = ServerAuth(tokens=["inline"], tokens_file="tokens", tokens_env="TOKENS_UNDER_TEST").resolved(tmp_path)
    tokens = auth.load()
    assert len(tokens) == 4
    assert all(tokens.accepts(t) for t in ("inline", "file-token", "env-1", "env-2"))
    assert not any(tokens.accepts(t) for t in ("", "inlin", "inline ", "# comment", "env-1, env-2"))
    for text in (repr(auth), repr(tokens), repr(ClientAuth(token="inline"))):
        assert "inline" not in text
    (tmp_path / "empty").write_text("# all retired\n")
    with pytest.raises(ValueError, match="no tokens"):
        ServerAuth(tokens_file="empty").resolved(tmp_path).load()
    monkeypatch.delenv("TOKENS_UNDER_TEST")
    with pytest.raises(ValueError, match="TOKENS_UNDER_TEST is not set"):
        auth.load()


def test_configs_resolve_paths_against_the_yaml_and_keep_cloud_a_string(tmp_path: Path) -> None:
    (tmp_path / "edge.yaml").write_text(
        yaml.safe_dump(
            {
                "model": MODEL,
                "cloud": "10.0.0.7:50051",
                "cloud_tls": {"ca": "certs/ca.crt", "server_name": "cloud.internal"},
                "cloud_auth": {"token_file": "/abs/token"},
                "tls": {"cert": "certs/edge.crt", "key": "certs/edge.key"},
            }
        )
    )
    config = EdgeConfig.from_yaml(str(tmp_path / "edge.yaml"))
    assert config.cloud == "10.0.0.7:50051"
    assert config.cloud_tls.ca == str(tmp_path / "certs/ca.crt") and config.cloud_tls.active
    assert config.cloud_tls.options() == [("grpc.ssl_target_name_override", "cloud.internal")]
    assert config.cloud_auth.token_file == "/abs/token"
    assert config.tls.cert == str(tmp_path / "certs/edge.crt") and config.tls.enabled
    # A mistake names its section.
    with pytest.raises(SettingsError, match=r"^tls: cert and key go together"):
        CloudConfig.from_dict({"tls": {"cert": "a.crt"}})
    with pytest.raises(SettingsError, match=r"^tls: ca verifies client certificates"):
        CloudConfig.from_dict({"tls": {"cert": "a.crt", "key": "a.key", "ca": "ca.crt"}})
    with pytest.raises(SettingsError, match=r"^auth.token: unknown key"):
        CloudConfig.from_dict({"auth": {"token": "x"}})
    assert not CloudConfig().tls.enabled and not CloudConfig().auth.enabled


def test_non_loopback_bind_needs_tls(pki: Pki, home: Path) -> None:
    with pytest.raises(ValueError, match=r"'0\.0\.0\.0:0' is not loopback and TLS is not configured; configure tls"):
        Daemon("0.0.0.0:0", [])
    # With TLS (mutual, and tokens: nothing is open to the network but health) it binds and serves.
    tls = ServerTLS(str(pki.server_cert), str(pki.server_key), str(pki.ca), require_client_cert=True)
    daemon = Daemon("0.0.0.0:0", [], tls=tls, auth=ServerAuth(tokens=["t"]))
    daemon.start()
    try:
        with open_channel(f"127.0.0.1:{daemon.port}", tls=client_tls(pki)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        daemon.stop(0)
    # The daemon's own command refuses it the same way, naming the address (it exits before loading anything).
    (home / "public.yaml").write_text(yaml.safe_dump({"listen": "0.0.0.0:0", "models": [MODEL]}))
    done = subprocess.run(
        [sys.executable, "-m", "cloud_node.main", "--config", str(home / "public.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "'0.0.0.0:0' is not loopback and TLS is not configured" in done.stderr


# -- real daemons -----------------------------------------------------------------------------------


def test_tls_client_works_and_plaintext_fails(edge: DaemonProcess, pki: Pki) -> None:
    status = edge_status(edge.address, tls=client_tls(pki, cert=False), token=EDGE_TOKENS[1])
    assert isinstance(status, edge_pb2.EdgeStatus) and status.model == "tiny"
    assert edge_status(edge.address, token=EDGE_TOKENS[0]) == "UNAVAILABLE"
    # A client that trusts another CA refuses the server's certificate.
    assert edge_status(edge.address, tls=ClientTLS(ca=str(pki.rogue_ca)), token=EDGE_TOKENS[0]) == "UNAVAILABLE"


def test_tokens_are_required_except_for_health(cloud: DaemonProcess, edge: DaemonProcess, pki: Pki) -> None:
    tls = client_tls(pki)
    assert get_info(cloud.address, tls=tls) == "UNAUTHENTICATED"
    assert get_info(cloud.address, tls=tls, token="wrong") == "UNAUTHENTICATED"
    assert get_info(cloud.address, tls=tls, token=EDGE_TOKENS[0]) == "UNAUTHENTICATED"  # the edge's, not the cloud's
    assert get_info(cloud.address, tls=tls, token=CLOUD_TOKEN) == "tiny"
    assert edge_status(edge.address, tls=client_tls(pki, cert=False)) == "UNAUTHENTICATED"
    assert edge_status(edge.address, tls=client_tls(pki, cert=False), token=CLOUD_TOKEN) == "UNAUTHENTICATED"
    with open_channel(cloud.address, tls=tls) as channel:
        # Streams are refused too, before the server reads a frame; reflection as well.
        with pytest.raises(grpc.RpcError) as err:
            list(si_grpc.SplitInferenceStub(channel).Probe(iter([si_pb2.ProbeMessage()]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open: load balancers probe it without credentials.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert CLOUD_TOKEN not in cloud.log_tail(200) and CLOUD_TOKEN not in edge.log_tail(200)


def test_mutual_tls_needs_a_certificate_from_the_ca(cloud: DaemonProcess, pki: Pki) -> None:
    rogue = ClientTLS(ca=str(pki.ca), cert=str(pki.rogue_cert), key=str(pki.rogue_key))
    assert get_info(cloud.address, tls=client_tls(pki, cert=False), token=CLOUD_TOKEN) == "UNAVAILABLE"
    assert get_info(cloud.address, tls=rogue, token=CLOUD_TOKEN) == "UNAVAILABLE"
    assert get_info(cloud.address, tls=client_tls(pki), token=CLOUD_TOKEN) == "tiny"


def test_edge_splits_through_a_secured_cloud(edge: DaemonProcess, pki: Pki) -> None:
    client = EdgeClient(edge.address, tls=client_tls(pki, cert=False), token=EDGE_TOKENS[0])
    try:
        deadline = time.monotonic() + 30
        while not (status := client.status()).cloud_reachable and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.cloud_reachable, status.cloud_error
        model = LoadedModel.load(ModelSpec.from_dict(MODEL))
        x = torch.rand(MODEL["input_shape"])
        reply = client.infer(x, timeout=30)
        assert reply.placement == edge_pb2.SPLIT, reply.note
        assert reply.plan.cut_index == CUT and reply.bytes_up > 0 and reply.timing.cloud_compute_ms > 0
        with torch.inference_mode():
            expected = model.module(x)
        got = outputs_of(reply)[0]
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max() + 1e-3  # int8 features
    finally:
        client.close()


def test_cli_talks_to_secured_daemons(
    cloud: DaemonProcess, edge: DaemonProcess, pki: Pki, home: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("CLEAVE_TOKEN", EDGE_TOKENS[0])
    monkeypatch.setenv("CLEAVE_CA", str(pki.ca))
    assert cleave(["infer", "--edge", edge.address, "--random", "1", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["placement"] == "SPLIT"
    assert cleave(["status", "--edge", edge.address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny"
    # Flags beat the environment: the cloud takes its own token and a client certificate.
    args = ["info", "--cloud", cloud.address, "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    assert cleave([*args, "--token-file", str(home / "to-cloud.token"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == "tiny"
    assert cleave(args) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.delenv("CLEAVE_TOKEN")
    assert cleave(["status", "--edge", edge.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_edge_with_a_wrong_token_is_refused_not_served(cloud: DaemonProcess, pki: Pki) -> None:
    model = LoadedModel.load(ModelSpec.from_dict(MODEL))
    link = CloudLink(
        cloud.address,
        model,
        LinkMonitor(),
        Reconnect(initial_s=5.0, max_s=5.0, connect_timeout_s=3.0),
        1 << 20,
        64 << 20,
        tls=client_tls(pki),
        token="stolen-or-stale",
    ).start()
    try:
        link.want(CUT)
        assert not link.reachable and "invalid bearer token" in link.last_error
    finally:
        link.close()


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads CLEAVE_* variables: a developer's own settings must not leak into these tests."""
    for name in [n for n in os.environ if n.startswith("CLEAVE_")]:
        monkeypatch.delenv(name)


def test_cli_explains_a_failed_tls_handshake(cloud: DaemonProcess, edge: DaemonProcess, pki: Pki, capsys) -> None:
    # gRPC says only "Socket closed" or "handshake failed"; the CLI says what the client can know.
    assert cleave(["info", "--cloud", cloud.address]) == 1  # plaintext to a TLS daemon
    err = capsys.readouterr().err
    assert "TLS handshake" in err and "spoke plaintext" in err and "--ca" in err
    rogue = ["--ca", str(pki.ca), "--cert", str(pki.rogue_cert), "--key", str(pki.rogue_key)]
    assert cleave(["info", "--cloud", cloud.address, *rogue]) == 1  # a certificate from another CA
    err = capsys.readouterr().err
    assert "TLS handshake" in err and "refused the client certificate" in err
    assert cleave(["info", "--cloud", cloud.address, "--ca", str(pki.ca)]) == 1  # mutual TLS, no certificate
    err = capsys.readouterr().err
    assert "TLS handshake" in err and "client certificate" in err and "--cert" in err
    assert cleave(["status", "--edge", edge.address, "--ca", str(pki.rogue_ca)]) == 1  # its certificate: not our CA
    err = capsys.readouterr().err
    assert "TLS handshake" in err and "--ca is not the CA of its certificate" in err
