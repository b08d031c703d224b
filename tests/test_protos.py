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


def test_tensor_encoding_kept_its_wire_form_when_it_moved_to_tensor_proto() -> None:
    """``TensorEncoding`` moved from split_inference.proto to tensor.proto (same package, same fields).

    The bytes below were serialised by the stubs from before the move; peers on either side of it
    must keep reading each other's sessions.
    """
    from protos.cleave.v1 import split_inference_pb2, tensor_pb2

    encoding = tensor_pb2.TensorEncoding(
        encoding=tensor_pb2.AFFINE, bits=4, per_channel=True, clip="percentile", codec=tensor_pb2.ZSTD, level=-5
    )
    encoding.quality = 75
    request = split_inference_pb2.OpenSessionRequest(
        model="m", fingerprint="f", cut="3", client="c", result_encoding=encoding
    )
    before_the_move = bytes.fromhex(
        "0a016d1201661a01332221080310041801220a70657263656e74696c65280230fbffffffffffffffff01384b2a0163"
    )
    assert request.SerializeToString(deterministic=True) == before_the_move
    assert tensor_pb2.TensorEncoding.DESCRIPTOR.full_name == "cleave.v1.TensorEncoding"
    assert not hasattr(split_inference_pb2, "TensorEncoding")
