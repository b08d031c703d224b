"""Profiles: measured per node and per head, cached by fingerprint/host/torch/threads, sent over the wire."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from partitioner.costmodel import CostModel, Link
from partitioner.loaded import LoadedModel
from partitioner.profile import cache_key, cached_profile, from_proto, profile_model, to_proto


@pytest.fixture(scope="module")
def profile(local_model: LoadedModel):
    return profile_model(local_model, repeats=3, warmup=1, head_samples=5)


def test_profile_covers_every_node_and_anchors_heads(profile, local_model: LoadedModel) -> None:
    assert len(profile.node_ms) == len(profile.node_names) == len(list(local_model.graph.module.graph.nodes)) - 1
    assert all(ms >= 0 for ms in profile.node_ms) and profile.total_ms > 0
    assert len(profile.head_ms) == 5 and 0 in profile.head_ms
    curve = profile.curve()
    indices = [c.index for c in local_model.graph.cuts]
    heads = [curve.head_ms(i) for i in indices]
    assert heads == sorted(heads) and heads[-1] <= profile.total_ms + 1e-9
    assert curve.tail_ms(indices[0]) == pytest.approx(profile.total_ms, rel=0.05, abs=0.05)
    assert {"raw", "fp16", "int8", "int4", "jpeg"} <= set(profile.codecs)
    assert all(c.encode_ms_per_mb > 0 and c.decode_ms_per_mb > 0 for c in profile.codecs.values())


def test_wire_round_trip_and_validation(profile) -> None:
    back = from_proto(to_proto(profile))
    assert back.node_ms == pytest.approx(profile.node_ms) and back.head_ms == pytest.approx(profile.head_ms)
    assert back.codecs.keys() == profile.codecs.keys()
    bad = to_proto(profile)
    bad.nodes[3].ms = -1.0
    with pytest.raises(ValueError, match="negative"):
        from_proto(bad)


def test_cache_hits_and_keys(local_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path))
    first = cached_profile(local_model, repeats=2, warmup=1, head_samples=3)
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    assert cached_profile(local_model) == first  # read back, not measured again
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = cache_key(local_model, 1)
    finally:
        torch.set_num_threads(threads)
    assert other != cache_key(local_model, 1)  # another thread count is another profile
    assert cache_key(local_model, 2) != cache_key(local_model, 1)
    files[0].write_text("{not json")
    assert cached_profile(local_model, repeats=2, warmup=1, head_samples=3).model == local_model.name


def test_cost_model_bytes_come_from_real_features(profile, local_model: LoadedModel) -> None:
    cost = CostModel.measure(local_model, profile, profile)
    by_index = {c.index: c for c in cost.cuts}
    mid = by_index[local_model.graph.cuts[len(local_model.graph.cuts) // 2].index]
    assert mid.feature_bytes["raw+none"] >= mid.raw_bytes  # fp32 plus framing
    assert mid.feature_bytes["int8"] < mid.feature_bytes["fp16"] < mid.feature_bytes["raw+none"]
    assert mid.feature_bytes["int2"] < mid.feature_bytes["int4"] < mid.feature_bytes["int8"]
    assert {"int8c", "jpeg"} <= set(by_index[0].feature_bytes)
    memory = [c.edge_memory for c in cost.cuts]
    assert memory == sorted(memory)  # a longer head never needs less memory
    edge_only = next(c for c in cost.candidates() if c.kind == "edge")
    assert edge_only.predict(Link(1, 1, 1)).total_ms == pytest.approx(profile.total_ms)


def test_edge_and_cloud_profiles_never_share_a_cache_entry(local_model: LoadedModel) -> None:
    assert cache_key(local_model, 1, "edge") != cache_key(local_model, 1, "cloud")


def test_bytes_on_the_wire_are_the_median_over_several_inputs(profile, local_model: LoadedModel) -> None:
    from compressor import EncodingSpec, encode
    from partitioner.models import calibration_batch

    x = calibration_batch(local_model.input_shape, 3, seed=5)
    cost = CostModel.measure(local_model, profile, profile, x)
    single = CostModel.measure(local_model, profile, profile, x[:1])
    assert cost.output_bytes == single.output_bytes  # per input, not per batch
    cut = local_model.graph.cuts[len(local_model.graph.cuts) // 2]
    _, head, _ = local_model.parts(cut.index)
    spec = EncodingSpec.parse("int4")
    with torch.inference_mode():
        sizes = sorted(sum(encode(f, spec).ByteSize() for f in head(x[i : i + 1])) for i in range(3))
    measured = next(c for c in cost.cuts if c.index == cut.index).feature_bytes["int4"]
    # Kernels differ in the last bit between batch sizes; zstd's output moves by a few bytes at most.
    assert measured == pytest.approx(sizes[1], rel=0.01)


def test_profiles_at_two_input_shapes_never_share_a_cache_entry(
    local_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner.models import ModelSpec

    from .conftest import MODEL

    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path))
    small = LoadedModel.load(ModelSpec.from_dict({**MODEL, "input_shape": [1, 3, 32, 32]}))
    assert small.fingerprint == local_model.fingerprint  # the same model: only the input differs
    big = cached_profile(local_model, repeats=2, warmup=1, head_samples=3)
    # What `cleave profile --input-shape 1,3,32,32` does after a 64x64 run: it must measure again.
    first = cached_profile(small, repeats=2, warmup=1, head_samples=3)
    assert big.input_shape == [1, 3, 64, 64] and first.input_shape == [1, 3, 32, 32]
    # The first conv's output has a quarter of the pixels at half the side.
    assert first.output_bytes[1] * 4 == big.output_bytes[1]
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2
    assert cached_profile(small) == first and cached_profile(local_model) == big  # each read back from its entry
    # The same entry whether the shape comes from the model or is asked for explicitly (the cloud's Profile RPC).
    assert cached_profile(local_model, input_shape=(1, 3, 32, 32)) == first
    assert cache_key(local_model, 1, input_shape=(1, 3, 32, 32)) == cache_key(small, 1)
    with pytest.raises(ValueError, match="input_shape"):
        cached_profile(local_model, input_shape=(3, 32, 32))


def test_cloud_profiles_at_the_input_shape_asked(cloud) -> None:
    import grpc

    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
    from runtime.serving import open_channel

    with open_channel(cloud.address) as channel:
        stub = si_grpc.SplitInferenceStub(channel)
        ask = {"model": "resnet18", "repeats": 2, "warmup": 1}
        reply = stub.Profile(si_pb2.ProfileRequest(input_shape=[1, 3, 32, 32], **ask), timeout=300)
        assert list(reply.input_shape) == [1, 3, 32, 32]
        assert from_proto(reply).output_bytes[1] == 64 * 16 * 16 * 4  # conv1's output at 32x32, not at 64x64
        with pytest.raises(grpc.RpcError) as bad:
            stub.Profile(si_pb2.ProfileRequest(input_shape=[3, 32, 32], **ask), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_shape" in bad.value.details()
        with pytest.raises(grpc.RpcError) as huge:
            stub.Profile(si_pb2.ProfileRequest(input_shape=[1024, 3, 4096, 4096], **ask), timeout=30)
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Profile(si_pb2.ProfileRequest(input_shape=[1, 4, 32, 32], **ask), timeout=60)  # 4 channels, not 3
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_shape" in wrong.value.details()
        assert stub.Profile(si_pb2.ProfileRequest(**ask), timeout=300).input_shape == [1, 3, 64, 64]  # still serving


def test_parts_are_timed_round_robin_so_a_drifting_host_moves_them_together() -> None:
    """A host that becomes 3x slower halfway: timed one after the other, the second part would look 6x the first."""
    import time

    from partitioner.profile import interleaved_ms

    calls = [0]

    def part(ms: float):
        def run(_x: object) -> None:
            calls[0] += 1
            time.sleep(ms * (3 if calls[0] > 8 else 1) / 1e3)

        return run

    timed = interleaved_ms({0: part(4.0), 1: part(8.0)}, None, rounds=7)
    assert calls[0] == 16  # a warm-up round, then 7 rounds of both
    assert timed[1] / timed[0] == pytest.approx(2.0, rel=0.25)


class StepClock:
    """Wall and CPU clocks (seconds, as ``time``'s) that move only when a part says how long it took."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def take(self, wall_ms: float, cpu_ms: float) -> None:
        self.wall += wall_ms / 1e3
        self.cpu += cpu_ms / 1e3

    def module(self):
        import types

        return types.SimpleNamespace(perf_counter=lambda: self.wall, process_time=lambda: self.cpu)


def test_rounds_stop_once_every_median_holds_still(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a steady host the rounds after ``min_rounds`` are not run; a drifting host runs them all;
    ``spent`` adds up every timed call's wall and CPU time (the host's wall time per CPU second)."""
    from partitioner import profile as profile_mod
    from partitioner.profile import interleaved_ms

    clock = StepClock()
    monkeypatch.setattr(profile_mod, "time", clock.module())
    calls = [0]

    def part(ms: float, drift: float = 0.0):
        def run(_x: object) -> None:
            calls[0] += 1
            clock.take(ms * (1 + drift * calls[0]), ms / 2)  # half a CPU ms per wall ms

        return run

    spent = [0.0, 0.0]
    steady = interleaved_ms({0: part(4.0), 1: part(8.0)}, None, rounds=5, min_rounds=3, spent=spent)
    assert calls[0] == 2 * (1 + 3)  # a warm-up round and 3 of 5 rounds
    assert steady == {0: pytest.approx(4.0), 1: pytest.approx(8.0)}
    assert spent[0] == pytest.approx(3 * 12.0) and spent[0] / spent[1] == pytest.approx(2.0)
    calls[0] = 0
    interleaved_ms({0: part(4.0, drift=0.05), 1: part(8.0, drift=0.05)}, None, rounds=5, min_rounds=3)
    assert calls[0] == 2 * (1 + 5)  # each round 10% slower than the last: every round runs
    calls[0] = 0
    interleaved_ms({0: part(4.0), 1: part(8.0)}, None, rounds=5)
    assert calls[0] == 2 * (1 + 5)  # without min_rounds, as many rounds as asked


def test_the_whole_model_is_timed_only_in_the_rounds_with_the_heads(local_model: LoadedModel) -> None:
    """The host's wall time per CPU second comes from the rounds that time the heads and the whole
    model together: the whole model is not also run 3 + 10 more times on its own to find it."""
    module = local_model.graph.module
    calls = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    try:
        profile = profile_model(local_model, repeats=10, warmup=3, head_samples=3)
    finally:
        del module.forward
    assert 1 + 2 + 3 <= calls[0] <= 2 + 1 + 5  # warm-up runs, the warm-up round, 3 to 5 rounds
    assert profile.total_ms > 0 and len(profile.node_ms) == len(profile.node_names)


def test_monotone_fit_is_the_least_squares_non_decreasing_sequence() -> None:
    from partitioner.profile import monotone_fit

    assert monotone_fit([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone_fit([1.0, 4.0, 2.0, 3.0]) == pytest.approx([1.0, 3.0, 3.0, 3.0])
    assert monotone_fit([5.0, 1.0]) == pytest.approx([3.0, 3.0])


def test_a_profile_measured_on_a_busy_machine_is_used_but_not_cached(
    local_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A profile timed under other work is this moment's contention: cached, every later plan would
    reuse it (a cloud that timed its model at 40x its quiet cost kept planning edge-only)."""
    import partitioner.profile as profile_mod

    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CLEAVE_PROFILE_MAX_LOAD", "1.0")
    cpus = os.cpu_count() or 1
    monkeypatch.setattr(profile_mod.os, "getloadavg", lambda: (4.0 * cpus, 0.0, 0.0))
    with caplog.at_level("WARNING", logger="partitioner.profile"):
        busy = cached_profile(local_model, repeats=2, warmup=1, head_samples=3)
    assert busy.total_ms > 0 and "busy" in caplog.text
    assert not list((tmp_path / "profiles").glob("*.json"))  # used, not cached

    monkeypatch.setattr(profile_mod.os, "getloadavg", lambda: (0.5 * cpus, 0.0, 0.0))
    quiet = cached_profile(local_model, repeats=2, warmup=1, head_samples=3)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    assert cached_profile(local_model) == quiet  # the quiet one is read back
