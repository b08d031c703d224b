"""The cloud's tails on Ray Serve (issue 16): exactness, KServe, a replica killed under load, autoscaling.

One local Ray instance with bounded resources (2 CPUs, a 200 MB object store, no dashboard), shared
with the other Ray modules: tests/conftest.py's ``ray_instance``. Each test runs its own in-process cloud daemon
with ``ray.address: auto`` (it joins this instance) under its own application name, and deletes its
applications when done. Skipped, saying why, where Ray Serve is not installed.
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from cleave_cli.main import main as cleave
from cloud_node.config import CloudConfig
from cloud_node.main import build_daemon, close_services
from compressor import RAW_UNCOMPRESSED, Assembler, CodecLimits, EncodingSpec, decode, encode
from partitioner.loaded import LoadedModel, as_tensor_list
from partitioner.models import ModelSpec, calibration_batch
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import DeadlineExceeded

from .test_daemons import frames_for

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'cleave[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'cleave[ray]')")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("ray_instance"),
]

ROOT = Path(__file__).resolve().parents[1]
RESNET = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 64, 64]}
SLOW = {"name": "slow", "source": "tests.support.factories:slow_tail_cnn", "input_shape": [1, 3, 16, 16]}
SLEEP_S = 0.05  # the slow model's tail, in its replicas only
KILL_SLEEP_S = 0.2  # the same for the replica-kill test (see there)


@contextmanager
def ray_cloud(
    models: list[dict], app: str, registry: CollectorRegistry | None = None, **ray_settings: object
) -> Iterator[tuple[int, object]]:
    """A cloud daemon in this process whose tails run on the module's Ray instance; (port, its RayTails)."""
    settings = {"address": "auto", "app_name": app, "num_cpus": 0.5, "torch_threads": 1, **ray_settings}
    config = CloudConfig.from_dict({"listen": "127.0.0.1:0", "models": models, "torch_threads": 1, "ray": settings})
    daemon = build_daemon(config, registry)
    port = daemon.start()
    tails = next(s.servicer for s in daemon.services if hasattr(s.servicer, "sessions")).sessions.remote
    try:
        yield port, tails
    finally:
        daemon.stop(grace=1)
        close_services(daemon)
        for model in models:
            serve.delete(f"{app}-{model['name']}")


@contextmanager
def plain_cloud(models: list[dict]) -> Iterator[int]:
    config = CloudConfig.from_dict({"listen": "127.0.0.1:0", "models": models, "torch_threads": 1})
    daemon = build_daemon(config)
    port = daemon.start()
    try:
        yield port
    finally:
        daemon.stop(grace=1)
        close_services(daemon)


def run_stream(
    port: int, model: LoadedModel, cut: str, requests: Iterable[tuple[int, list]], spec: EncodingSpec = RAW_UNCOMPRESSED
) -> dict[int, list[torch.Tensor]]:
    """Send each (request id, head outputs) on one Infer stream, one at a time; request id -> decoded outputs."""
    got: dict[int, list[torch.Tensor]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        sid = stub.OpenSession(
            si_pb2.OpenSessionRequest(model=model.name, fingerprint=model.fingerprint, cut=cut), timeout=60
        ).session_id
        outbox: queue.Queue = queue.Queue()
        replies = stub.Infer(iter(outbox.get, None), timeout=120)
        for rid, features in requests:
            for frame in frames_for(sid, rid, [encode(f, spec) for f in features]):
                outbox.put(frame)
            assembler = Assembler()
            while True:
                result = next(replies)
                assert not result.HasField("error"), result.error.message
                assert result.request_id == rid
                assembler.add(result.chunks)
                if result.last:
                    break
            assert rid not in got, f"request {rid} answered twice"
            got[rid] = [decode(t) for t in assembler.finish()]
        outbox.put(None)
        stub.CloseSession(si_pb2.CloseSessionRequest(session_id=sid), timeout=30)
    return got


def cloud_status(port: int) -> dict:
    """``cleave status --cloud ... --json``, run here."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert cleave(["status", "--cloud", f"127.0.0.1:{port}", "--json"]) == 0
    return json.loads(out.getvalue())


def assert_each_answered_once_exactly(replies: list[dict[int, list[torch.Tensor]]], expected: list) -> None:
    """Request ids 1..len(expected), each answered once (run_stream checks) and bit-exact with its own reference."""
    answered = {rid: out for got in replies for rid, out in got.items()}
    assert sorted(answered) == list(range(1, len(expected) + 1))
    for rid, outputs in answered.items():
        for a, b in zip(outputs, expected[rid - 1], strict=True):
            assert torch.equal(a, b), f"request {rid} got another input's answer or a wrong one"


def test_split_inference_through_ray_tails_is_bit_exact_with_the_single_process_cloud() -> None:
    model = LoadedModel.load(ModelSpec.from_dict(RESNET))
    inputs = calibration_batch(RESNET["input_shape"], 4, seed=3)
    cases = []  # (cut, encoding, requests)
    for cut in ("x", "layer2_0_relu", "layer3_1_relu_1"):  # the input itself, a residual cut, a late one
        _, head, _ = model.parts(cut)
        with torch.inference_mode():
            requests = [(i + 1, as_tensor_list(head(inputs[i : i + 1]))) for i in range(len(inputs))]
        for spec in (RAW_UNCOMPRESSED, EncodingSpec(encoding="affine", bits=4, codec="zstd")):
            cases.append((cut, spec, requests))
    with plain_cloud([RESNET]) as port:
        expected = [run_stream(port, model, cut, reqs, spec) for cut, spec, reqs in cases]
        plain = cloud_status(port)
    with ray_cloud([RESNET], "exact") as (port, tails):
        got = [run_stream(port, model, cut, reqs, spec) for cut, spec, reqs in cases]
        pools = tails.status()
        on_ray = cloud_status(port)
    assert plain["backend"] == "process" and [p["model"] for p in plain["pools"]] == ["resnet18"]
    assert on_ray["backend"] == "ray" and on_ray["pools"][0]["running"] == 1
    assert on_ray["pools"][0]["replicas"] == {"RUNNING": 1}
    for (cut, spec, _), want, have in zip(cases, expected, got, strict=True):
        assert sorted(have) == sorted(want)
        for rid in want:
            for a, b in zip(want[rid], have[rid], strict=True):
                assert torch.equal(a, b), f"cut {cut}, {spec.encoding}: request {rid} differs"
    assert [p.model for p in pools] == ["resnet18"] and pools[0].running == 1
    assert pools[0].requests == sum(len(reqs) for _, _, reqs in cases) and pools[0].failures == 0
    assert pools[0].lane_requests == pools[0].requests  # all over the direct lane (the default transport)


KSERVE_MODELS = [
    {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]},
    {"name": "two", "source": "tests.support.factories:two_heads", "input_shape": [1, 3, 8, 8]},
]


def test_kserve_and_triton_clients_work_unchanged_against_ray_tails(tmp_path: Path) -> None:
    """The same client script as tests/test_kserve.py, against a cloud whose whole models run in replicas."""
    rng = np.random.default_rng(7)
    arrays = {
        "fp32": rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        "fp16": rng.standard_normal((2, 3, 16, 16)).astype(np.float16),
        "uint8": rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8),
        "int64": rng.integers(-3, 4, (1, 3, 16, 16), dtype=np.int64),
        "two": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
    }
    np.savez(tmp_path / "inputs.npz", **arrays)
    local = {m["name"]: LoadedModel.load(ModelSpec.from_dict(m)) for m in KSERVE_MODELS}

    def reference(name: str, key: str) -> list[np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(arrays[key].astype(np.float32))
            return [t.numpy() for t in as_tensor_list(local[name].module(x))]

    def check(record: dict, output: str, expected: np.ndarray) -> None:
        assert record["ok"], record
        out = record["outputs"][output]
        assert out["datatype"] == "FP32" and out["shape"] == list(expected.shape)
        np.testing.assert_allclose(
            np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]), expected, 1e-5, 1e-5
        )

    with ray_cloud(KSERVE_MODELS, "kserve") as (port, tails):
        results = {}
        for which in ("kserve", "triton"):
            done = subprocess.run(
                [
                    sys.executable,
                    "tests/support/v2_clients.py",
                    which,
                    f"127.0.0.1:{port}",
                    str(tmp_path / "inputs.npz"),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            assert done.returncode == 0, f"{which} client failed:\n{done.stderr[-3000:]}"
            results[which] = json.loads(done.stdout)
        served = {p.model: p.requests for p in tails.status()}
    kserve, triton = results["kserve"], results["triton"]
    assert kserve["health"] == {"ok": True, "live": True, "ready": True, "model_ready": True}
    for case, key in [("raw_FP32", "fp32"), ("raw_UINT8", "uint8"), ("typed_FP32", "fp32"), ("typed_INT64", "int64")]:
        check(kserve[case], "output", reference("tiny", key)[0])
    logits, pooled = reference("two", "two")
    check(kserve["two_all"], "output_0", logits)
    check(kserve["two_all"], "output_1", pooled)
    assert kserve["unknown_model"]["code"] == "NOT_FOUND"
    assert kserve["bad_shape"]["code"] == "INVALID_ARGUMENT" and "inputs[0].shape" in kserve["bad_shape"]["message"]
    for case in (c for c in triton if c.startswith("raw_") and triton[c].get("ok")):
        check(triton[case], "output", reference("tiny", case.split("_", 1)[1].lower())[0])
    assert served["tiny"] >= 4 and served["two"] >= 1  # the models ran in the replicas, not in the front door


def replica_names(app: str) -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}-")
    )


def busy_replicas(app: str) -> list[str]:
    """The replicas with a request in them by Serve's own count (its router's queue length), busiest first."""
    actors = {name: ray.get_actor(name, namespace="serve") for name in replica_names(app)}
    ongoing = {name: ray.get(a.get_num_ongoing_requests.remote(), timeout=10) for name, a in actors.items()}
    return sorted((name for name, n in ongoing.items() if n > 0), key=lambda name: -ongoing[name])


def wait_for(condition, timeout: float, what: str, tails=None, poll: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            state = [p.to_json() for p in tails.status()] if tails is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} {state}")
        time.sleep(poll)


@pytest.mark.parametrize("transport", ["grpc", "direct"])
def test_a_replica_killed_under_concurrent_load_loses_and_duplicates_nothing(transport: str) -> None:
    model = LoadedModel.load(ModelSpec.from_dict(SLOW))
    cut = "relu"
    _, head, tail = model.parts(cut)
    streams, per_stream = 4, 12
    inputs = calibration_batch(SLOW["input_shape"], streams * per_stream, seed=11)
    with torch.inference_mode():
        features = [as_tensor_list(head(inputs[i : i + 1])) for i in range(len(inputs))]
        expected = [as_tensor_list(tail(*f)) for f in features]  # no sleep here: the variable is the replicas'
    # Each request sits in a replica for most of its life (routing and the stream take a few ms), so once every
    # stream has one in flight, spread over both replicas by the router, the victim holds one when it dies.
    env = {"CLEAVE_TEST_TAIL_SLEEP_S": str(KILL_SLEEP_S)}
    app = f"kill{transport}"
    settings = {"replicas": 2, "min_replicas": 2, "max_replicas": 2, "env": env, "transport": transport}
    with ray_cloud([SLOW], app, **settings) as (port, tails):
        assert len(replica_names(app)) == 2
        killed = threading.Event()

        def stream(s: int) -> dict[int, list[torch.Tensor]]:
            ids = range(s * per_stream, (s + 1) * per_stream)
            return run_stream(port, model, cut, [(i + 1, features[i]) for i in ids])

        def killer() -> None:
            wait_for(lambda: tails.status()[0].requests >= streams * 3, 60, "load to build up", tails, 0.02)
            wait_for(lambda: tails.status()[0].in_flight >= streams, 10, "requests in flight", tails, 0.005)
            if transport == "grpc":  # Serve's router may hold a moment's requests on one replica: kill a busy one
                busy: list[str] = []

                def found_busy() -> bool:
                    busy[:] = busy_replicas(app)
                    return bool(busy)

                wait_for(found_busy, 10, "a replica with a request in it", tails, 0.005)
                victim = busy[0]
            else:  # the front door's lanes spread requests by their own in-flight counts: each replica has some
                victim = replica_names(app)[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed.set()

        with ThreadPoolExecutor(streams + 1) as pool:
            kill = pool.submit(killer)
            replies = list(pool.map(stream, range(streams)))
            kill.result()
        pool_status = tails.status()[0]
    assert killed.is_set()
    assert_each_answered_once_exactly(replies, expected)
    assert pool_status.retries >= 1, "the kill hit no request in flight: the test proved nothing"
    assert pool_status.failures == 0
    if transport == "direct":  # the requests went over the lanes, not Serve's handle
        assert pool_status.lane_requests >= streams * per_stream


def test_replicas_replaced_under_load_lose_nothing_on_the_lane() -> None:
    """Serve replaces both replicas while 4 streams run over their lanes: every request answered once, exact.

    Redeploying with one replica makes Serve replace the two (a deployment without a fixed ``version``
    gets a new one each time) by one new replica: each old one drains (Serve's requests, then its
    lane's in ``__del__``) while the front door moves to the new one, over Serve's handle until it
    knows the new lane.
    """
    from cloud_node.ray_backend.replica import TailReplica
    from cloud_node.ray_backend.serving import app_name, deployment_options

    model = LoadedModel.load(ModelSpec.from_dict(SLOW))
    _, head, tail = model.parts("relu")
    streams, per_stream = 4, 15
    inputs = calibration_batch(SLOW["input_shape"], streams * per_stream, seed=13)
    with torch.inference_mode():
        features = [as_tensor_list(head(inputs[i : i + 1])) for i in range(len(inputs))]
        expected = [as_tensor_list(tail(*f)) for f in features]
    env = {"CLEAVE_TEST_TAIL_SLEEP_S": str(KILL_SLEEP_S)}
    settings = {"replicas": 2, "min_replicas": 2, "max_replicas": 2, "env": env, "graceful_shutdown_timeout_s": 6}
    with ray_cloud([SLOW], "drain", **settings) as (port, tails):
        assert len(replica_names("drain")) == 2
        shrunk = threading.Event()

        def stream(s: int) -> dict[int, list[torch.Tensor]]:
            ids = range(s * per_stream, (s + 1) * per_stream)
            return run_stream(port, model, "relu", [(i + 1, features[i]) for i in ids])

        def shrink() -> None:
            wait_for(lambda: tails.status()[0].in_flight >= streams, 60, "requests in flight", tails, 0.005)
            options = {**deployment_options(tails.settings, "slow"), "num_replicas": 1}
            lanes = tails.settings.graceful_shutdown_timeout_s - 1.0
            app = (
                serve.deployment(TailReplica)
                .options(**options)
                .bind(model.spec, model.fingerprint, 1, 1, 0.0, lane=True, drain_s=lanes)
            )
            serve.run(app, name=app_name(tails.settings, "slow"), route_prefix=None)
            wait_for(lambda: len(replica_names("drain")) == 1, 60, "one replica to be removed", tails)
            shrunk.set()

        with ThreadPoolExecutor(streams + 1) as pool:
            done = pool.submit(shrink)
            replies = list(pool.map(stream, range(streams)))
            done.result()
        status = tails.status()[0]
    assert shrunk.is_set()
    assert_each_answered_once_exactly(replies, expected)
    assert status.failures == 0 and status.requests == streams * per_stream
    assert status.lane_requests > 0 and status.running == 1


def test_a_request_past_its_deadline_answers_deadline_exceeded_and_leaves_nothing_in_flight() -> None:
    """A tail slower than ``request_timeout_s`` answers DEADLINE_EXCEEDED at the deadline, not when the tail ends."""
    model = LoadedModel.load(ModelSpec.from_dict(SLOW))
    cut, head, _ = model.parts("relu")
    with torch.inference_mode():
        features = [encode(t, RAW_UNCOMPRESSED) for t in as_tensor_list(head(calibration_batch([1, 3, 16, 16], 1)))]
    env = {"CLEAVE_TEST_TAIL_SLEEP_S": "1.0"}
    with ray_cloud([SLOW], "deadline", request_timeout_s=0.3, env=env) as (_port, tails):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="request_timeout_s"):
            tails.run("slow", cut.index, features, RAW_UNCOMPRESSED, CodecLimits())
        waited = time.monotonic() - started
        pool = tails.status()[0]
    assert 0.3 <= waited < 1.0, f"answered after {waited:.2f}s: the deadline was not kept"
    assert (pool.requests, pool.failures, pool.in_flight) == (1, 1, 0)


@pytest.mark.parametrize("transport", ["grpc", "direct"])
def test_autoscaling_goes_from_one_to_two_replicas_under_load_and_back(transport: str) -> None:
    model = LoadedModel.load(ModelSpec.from_dict(SLOW))
    _, head, _ = model.parts("relu")
    with torch.inference_mode():
        features = as_tensor_list(head(calibration_batch(SLOW["input_shape"], 1, seed=5)))
    scaling = {
        "replicas": 1,
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 3.0,
        "look_back_period_s": 2.0,
        "env": {"CLEAVE_TEST_TAIL_SLEEP_S": str(SLEEP_S)},
        "transport": transport,
    }
    registry = CollectorRegistry()
    app = f"scale{transport}"
    with ray_cloud([SLOW], app, registry, **scaling) as (port, tails):
        assert tails.status()[0].running == 1
        stop = threading.Event()

        def load(s: int) -> int:
            def requests() -> Iterator[tuple[int, list]]:
                rid = 0
                while not stop.is_set():
                    rid += 1
                    yield rid, features

            return len(run_stream(port, model, "relu", requests()))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, s) for s in range(4)]
            try:
                wait_for(lambda: tails.status()[0].running == 2, 60, "a second replica under load", tails)
                scaled = cloud_status(port)["pools"][0]
                metrics = generate_latest(registry).decode()
            finally:
                stop.set()
            assert sum(f.result() for f in futures) > 0
        wait_for(lambda: tails.status()[0].running == 1 and len(replica_names(app)) == 1, 60, "scale-down", tails)
        decisions = tails.status()[0].decisions
        after = cloud_status(port)["pools"][0]
    assert [(d["from"], d["to"]) for d in decisions][-2:] == [(1, 2), (2, 1)]
    assert scaled["running"] == 2 and (
        scaled["decisions"][-1]["from_replicas"],
        scaled["decisions"][-1]["to_replicas"],
    ) == (1, 2)
    assert 'cleave_ray_replicas{model="slow",state="RUNNING"} 2.0' in metrics
    assert after["running"] == 1 and after["decisions"][-1]["to_replicas"] == 1 and after["failures"] == 0
    if transport == "direct":  # the load the autoscaler saw went over the lanes, not Serve's handle
        assert tails.status()[0].lane_requests == tails.status()[0].requests > 0


def test_cleave_cloud_with_ray_address_local_starts_and_stops_its_own_ray(tmp_path: Path) -> None:
    """The daemon as users start it: ``--ray-address local`` in a subprocess, Ray started and shut down by it.

    Ray's processes die with the thread that started them; the daemon loads its models on a thread
    that ends, so a request after loading only succeeds if Ray was started on a thread that lives on.
    """
    from cleave_cli.launch import cloud_process, free_port

    model = LoadedModel.load(ModelSpec.from_dict(KSERVE_MODELS[0]))
    _, head, tail = model.parts(2)
    x = calibration_batch(KSERVE_MODELS[0]["input_shape"], 1, seed=2)
    with torch.inference_mode():
        features = as_tensor_list(head(x))
        expected = as_tensor_list(tail(*features))
    ray_section = {"local_num_cpus": 1, "local_object_store_mb": 100, "num_cpus": 0.5, "app_name": "own"}
    (tmp_path / "cloud.yaml").write_text(
        json.dumps({"models": [KSERVE_MODELS[0]], "torch_threads": 1, "ray": ray_section})
    )
    cloud = cloud_process(tmp_path / "cloud.yaml", free_port(), tmp_path / "cloud.log")
    cloud.args += ["--ray-address", "local"]
    cloud.start(ready_timeout=180)
    try:
        time.sleep(3)  # past the end of the loading thread
        got = run_stream(cloud.port, model, "2", [(1, features)])
        status = cloud_status(cloud.port)
    finally:
        assert cloud.stop(timeout=60) == 0, cloud.log_tail()
    assert all(torch.equal(a, b) for a, b in zip(got[1], expected, strict=True))
    assert status["backend"] == "ray" and status["pools"][0]["running"] == 1
