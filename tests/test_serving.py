"""The shared Daemon: reflection lists the services, undecodable bytes answer INVALID_ARGUMENT,
and stopping drains in-flight calls while health reports NOT_SERVING."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import NotFound, maps_errors
from runtime.serving import Daemon, Service

SERVICE = si_pb2.DESCRIPTOR.services_by_name["SplitInference"]


class SlowInfo(si_grpc.SplitInferenceServicer):
    """GetInfo takes ``delay`` seconds; an unknown model answers NOT_FOUND."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = threading.Event()

    @maps_errors
    def GetInfo(self, request, context):
        if request.model == "missing":
            raise NotFound("model 'missing' is not served here")
        self.started.set()
        time.sleep(self.delay)
        return si_pb2.GetInfoResponse(version="slow")


@pytest.fixture()
def daemon():
    servicer = SlowInfo(delay=1.0)
    server = Daemon("127.0.0.1:0", [Service(servicer, SERVICE)], max_workers=4)
    server.start()
    yield server, servicer
    server.stop(0)


def test_reflection_lists_services(daemon) -> None:
    server, _ = daemon
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"cleave.v1.SplitInference", "grpc.health.v1.Health"} <= names


def test_errors_and_undecodable_requests(daemon) -> None:
    server, _ = daemon
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(si_pb2.GetInfoRequest(model="missing"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "missing" in err.value.details()
        raw = channel.unary_unary("/cleave.v1.SplitInference/GetInfo")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cleave.v1.GetInfoRequest" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Profile(si_pb2.ProfileRequest(model="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stop_drains_in_flight_calls(daemon) -> None:
    server, servicer = daemon
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="cleave.v1.SplitInference"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = stub.GetInfo.future(si_pb2.GetInfoRequest(), timeout=10)
        assert servicer.started.wait(5)
        stopper = threading.Thread(target=server.stop, args=(5.0,))
        stopper.start()
        # Load balancers watching health hear NOT_SERVING first; the running call still finishes.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert in_flight.result().version == "slow"
        stopper.join(10)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(), timeout=1)
