"""The committed stubs match a fresh ``make protos``; the wire helpers behave."""

from pathlib import Path

import grpc
import pytest

from protos import errors, generate
from runtime.serving import Daemon, is_loopback


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generated = generate.generate(tmp_path)
    assert len(generated) == 3 * len(generate.proto_files())
    stale = [p.name for p in generated if p.read_bytes() != generate.committed(p, tmp_path).read_bytes()]
    assert not stale, f"stale stubs, run `make protos`: {stale}"


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.0.0.2:1", False),
        ("example.org:1", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_public_bind_without_tls_needs_opt_in() -> None:
    with pytest.raises(ValueError, match="allow_insecure_public"):
        Daemon("0.0.0.0:0", [])


def test_error_mapping_round_trip() -> None:
    exc = errors.InvalidArgument("tensor.bits: 7")
    assert errors.status_of(exc) == (grpc.StatusCode.INVALID_ARGUMENT, "tensor.bits: 7")
    assert errors.status_of(RuntimeError("boom"))[0] == grpc.StatusCode.INTERNAL

    class FakeRpcError(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.NOT_FOUND

        def details(self):
            return "model 'x'"

    back = errors.from_rpc_error(FakeRpcError())
    assert isinstance(back, errors.NotFound) and back.message == "model 'x'"
