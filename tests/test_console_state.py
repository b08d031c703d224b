"""The console's JSON without a browser: an edge's plan prediction from ``OpenSession`` to the
console state (wire round-trip, validation, a real edge + cloud pair), and the jobs' plots listed.

The browser test (tests/test_console.py) renders the same state; this one runs everywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import yaml

from cleave_cli.client import EdgeClient
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from cloud_node.config import CloudLimits
from cloud_node.sessions import ModelRegistry, PlanPrediction, SessionManager
from cloud_node.web.app import Backends
from cloud_node.web.console import plots_json, sessions_json
from compressor import EncodingSpec
from partitioner.costmodel import Breakdown
from partitioner.models import ModelSpec
from partitioner.placement import Placement
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import InvalidArgument

TINY = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
PREDICTION = si_pb2.PlanPrediction(
    label="SPLIT at 2, int8",
    objective="latency",
    total_ms=12.5,
    edge_ms=3.0,
    encode_ms=0.5,
    upload_ms=4.0,
    rtt_ms=2.0,
    decode_ms=0.25,
    cloud_ms=2.5,
    download_ms=0.25,
)


@pytest.fixture(scope="module")
def manager() -> SessionManager:
    spec = ModelSpec(name="tiny", source=TINY["source"], input_shape=tuple(TINY["input_shape"]))
    return SessionManager(ModelRegistry([spec]), CloudLimits())


def open_request(manager: SessionManager, **plan: float | str) -> si_pb2.OpenSessionRequest:
    model = manager.registry.get("tiny")
    request = si_pb2.OpenSessionRequest(model="tiny", fingerprint=model.fingerprint, cut="2", client="unit")
    request.plan.CopyFrom(PREDICTION)
    for name, value in plan.items():
        setattr(request.plan, name, value)
    return request


def test_the_prediction_crosses_the_wire_and_lands_on_the_session(manager: SessionManager) -> None:
    wire = open_request(manager).SerializeToString()
    session = manager.open(si_pb2.OpenSessionRequest.FromString(wire), owner="unit")
    try:
        assert session.plan == PlanPrediction(**{f.name: v for f, v in PREDICTION.ListFields()})
        # Without the field: no prediction, and the console says so (None), not zeros.
        plain = open_request(manager)
        plain.ClearField("plan")
        bare = manager.open(plain, owner="unit")
        assert bare.plan is None
        # The console: predicted cloud stages (decode + compute) next to the measured ones (none yet).
        rows = {r["id"]: r for r in sessions_json(Backends(sessions=manager))}
        row = rows[session.id[:8]]
        assert row["plan"]["total_ms"] == 12.5 and row["plan"]["label"] == "SPLIT at 2, int8"
        assert row["cloud_predicted_ms"] == 2.75 and row["cloud_measured_ms"] is None
        assert rows[bare.id[:8]]["plan"] is None and rows[bare.id[:8]]["cloud_predicted_ms"] is None
    finally:
        for s in manager.snapshot():
            manager.close(s.id)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("total_ms", math.nan),
        ("total_ms", math.inf),
        ("upload_ms", -1.0),
        ("cloud_ms", 3_600_001.0),
        ("label", "x" * 201),
        ("objective", "y" * 201),
    ],
)
def test_a_bad_prediction_is_refused_naming_its_field(manager: SessionManager, field: str, value: float | str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^plan\.{field}: "):
        manager.open(open_request(manager, **{field: value}), owner="unit")
    assert not manager.snapshot()  # nothing opened


def test_the_edge_reports_its_plan_clamped_to_what_the_cloud_takes() -> None:
    from edge_node.runtime import ActivePlan, plan_prediction

    cut = SimpleNamespace(index=2, name="layer1")
    predicted = Breakdown(edge_ms=1.0, encode_ms=math.inf, upload_ms=-0.5, cloud_ms=2.0)
    plan = ActivePlan(Placement.SPLIT, cut, EncodingSpec.parse("int8"), None, None, predicted=predicted)  # type: ignore[arg-type]
    message = plan_prediction(plan)
    assert message is not None and message.label.startswith("SPLIT at layer1, ")
    assert message.encode_ms == 3_600_000.0 and message.upload_ms == 0.0 and message.cloud_ms == 2.0
    PlanPrediction.from_proto(message)  # the cloud takes whatever the edge sends
    assert plan_prediction(ActivePlan(Placement.SPLIT, cut, EncodingSpec(), None, None)) is None  # type: ignore[arg-type]


def test_plots_list_every_png_artifact_of_the_latest_jobs() -> None:
    def artifact(name: str, media_type: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, media_type=media_type, size=10)

    jobs = [
        SimpleNamespace(
            id="j2",
            engine="bottleneck",
            artifacts=[artifact("curve.json", "application/json"), artifact("curve.png", "image/png")],
        ),
        SimpleNamespace(
            id="j1",
            engine="sweep",
            artifacts=[artifact("sweep.png", "image/png"), artifact("extra plot.png", "image/png")],
        ),
    ]
    manager = SimpleNamespace(list=lambda states, limit: jobs[:limit])
    plots = plots_json(Backends(jobs=manager), jobs_enabled=True)  # type: ignore[arg-type]
    assert [(p["job"], p["name"]) for p in plots] == [
        ("j2", "curve.png"),
        ("j1", "sweep.png"),
        ("j1", "extra plot.png"),
    ]
    assert plots[0]["title"].startswith("Rate-agreement curve") and plots[1]["title"].startswith("Pareto front")
    assert plots[2]["title"] == "extra plot.png" and plots[2]["url"] == "/api/v1/jobs/j1/artifacts/extra%20plot.png"
    assert plots_json(Backends(jobs=manager), jobs_enabled=False) == []  # type: ignore[arg-type]


# -- a real edge and cloud ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, DaemonProcess, str]]:
    path = tmp_path_factory.mktemp("console_state")
    http_port = free_port()
    cloud_config = {"models": [TINY], "torch_threads": 1, "http": {"listen": f"127.0.0.1:{http_port}"}}
    (path / "cloud.yaml").write_text(yaml.safe_dump(cloud_config))
    # The planner plans once (a baseline that always sends the input: a session with a prediction)
    # and does not re-plan during the test.
    edge_config = {
        "model": TINY,
        "torch_threads": 1,
        "autoplan": {"baseline": "cloud-raw", "check_interval_s": 3600.0, "probe_interval_s": 3600.0},
        "request_timeout_s": 20.0,
    }
    (path / "edge.yaml").write_text(yaml.safe_dump(edge_config))
    cloud = cloud_process(path / "cloud.yaml", free_port(), path / "cloud.log").start()
    edge = edge_process(path / "edge.yaml", free_port(), cloud.port, path / "edge.log").start()
    yield cloud, edge, f"http://127.0.0.1:{http_port}"
    edge.stop()
    cloud.stop()


@pytest.mark.integration
def test_the_console_shows_a_real_edges_prediction_beside_the_clouds_measurements(
    pair: tuple[DaemonProcess, DaemonProcess, str],
) -> None:
    cloud, edge, url = pair
    client = EdgeClient(edge.address)
    deadline = time.monotonic() + 120
    while not (status := client.status()).plan.reason.startswith("planned"):
        assert time.monotonic() < deadline, f"no plan: {status.planner_error}"
        time.sleep(0.3)
    assert status.plan.predicted.total_ms > 0
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for _ in range(4):
        client.infer(x)

    sessions = httpx.get(url + "/api/v1/console/state", timeout=10).json()["sessions"]
    assert len(sessions) == 1, sessions
    row = sessions[0]
    predicted = status.plan.predicted
    assert row["plan"]["total_ms"] == pytest.approx(predicted.total_ms)
    for stage in ("edge_ms", "encode_ms", "upload_ms", "rtt_ms", "decode_ms", "cloud_ms", "download_ms"):
        assert row["plan"][stage] == pytest.approx(getattr(predicted, stage)), stage
    assert row["plan"]["label"].startswith("CLOUD_ONLY") and row["plan"]["objective"] == "latency"
    assert row["cloud_predicted_ms"] == pytest.approx(predicted.decode_ms + predicted.cloud_ms, abs=1e-3)
    assert row["requests"] >= 4 and row["cloud_measured_ms"] > 0

    # The cloud's gRPC face refuses a bad prediction with INVALID_ARGUMENT naming the field.
    with grpc.insecure_channel(cloud.address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        fingerprint = stub.GetInfo(si_pb2.GetInfoRequest(model="tiny"), timeout=10).models[0].fingerprint
        bad = si_pb2.PlanPrediction(rtt_ms=-2)
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(
                si_pb2.OpenSessionRequest(model="tiny", fingerprint=fingerprint, cut="0", plan=bad), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("plan.rtt_ms")
