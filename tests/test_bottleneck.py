"""Learned bottlenecks: the range coder's bounds, training by distillation against int8 features,
artifacts that round-trip without pickle, and the compression engine's report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_node.config import JobsConfig
from cloud_node.jobs import JobManager
from cloud_node.jobs.bottleneck_engine import BottleneckEngine
from cloud_node.jobs.engines import JobContext, get_engine
from cloud_node.jobs.models import ModelSource
from cloud_node.jobs.store import QUEUED, RUNNING
from compressor.entropy import EntropyTables, decode_symbols, encode_symbols, max_payload
from compressor.errors import CodecError
from compressor.spec import EncodingSpec
from partitioner import bottleneck as bn
from partitioner.bottleneck.compare import int_k_points
from partitioner.bottleneck.modules import FactorizedPrior, make_modules
from partitioner.graph import trace
from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import InvalidArgument
from tests.support import tiny_bottleneck as small

CUT = "layer1_1_relu_1"  # (64, 8, 8) crossing at 32x32


def tables(channels: int = 3, half: int = 4, seed: int = 0) -> EntropyTables:
    rng = np.random.default_rng(seed)
    return EntropyTables(pmf=rng.random((channels, 2 * half + 1)) + 0.01, offset=-half)


def test_range_coder_round_trips_and_bounds_what_it_reads() -> None:
    t = tables()
    rng = np.random.default_rng(1)
    symbols = rng.integers(-4, 5, size=(2, 3, 5, 7)).astype(np.int32)
    data = encode_symbols(symbols, t)
    assert len(data) % 4 == 0 and len(data) <= max_payload(symbols.shape)
    assert np.array_equal(decode_symbols(data, t, symbols.shape), symbols)
    # the ideal code length is what the coder achieves, within the flush
    assert len(data) * 8 <= t.bits(symbols) + 64
    clamped = decode_symbols(encode_symbols(symbols * 10, t), t, symbols.shape)
    assert clamped.min() == -4 and clamped.max() == 4  # out-of-table values are clamped, not lost
    with pytest.raises(CodecError, match="tensor.payload: .* exceeds"):
        decode_symbols(b"\0" * (max_payload(symbols.shape) + 4), t, symbols.shape)
    with pytest.raises(CodecError, match="whole number of 32-bit words"):
        decode_symbols(data[:-1], t, symbols.shape)
    with pytest.raises(CodecError, match="more data than the expected shape"):
        decode_symbols(data + data, t, symbols.shape)
    with pytest.raises(CodecError, match="more data than the expected shape"):
        decode_symbols(data, t, (1, 3, 5, 7))  # a stream for 2 images read as 1
    with pytest.raises(CodecError, match="tensor.shape"):
        decode_symbols(data, t, (2, 4, 5, 7))
    with pytest.raises(CodecError, match="entropy.pmf"):
        EntropyTables(pmf=np.zeros((2, 3)), offset=0)


@pytest.fixture(scope="module")
def trained() -> dict:
    """The small classifier, its cut, and a bottleneck trained on it (timed)."""
    torch.set_num_threads(1)
    model = small.classifier()
    x, _, groups = small.images()
    train_idx, held_idx = small.split()
    graph = trace(model, x[:1])
    head, tail = graph.split(CUT)
    t0 = time.perf_counter()
    config = bn.BottleneckConfig(channels=64, latent=8, hidden=32)
    b = bn.train(
        head,
        tail,
        bn.augment(x[train_idx], 3, seed=1),
        config,
        bn.TrainConfig(rate_weight=0.02, max_steps=100, budget_s=50),
        cut=(graph.cut(CUT).index, CUT),
    )
    seconds = time.perf_counter() - t0
    return {"model": model, "head": head, "tail": tail, "held": x[held_idx], "b": b, "seconds": seconds}


@pytest.mark.slow  # trains a bottleneck
def test_bottleneck_sends_fewer_bytes_than_int8_features_and_keeps_agreement(trained: dict) -> None:
    b, head, tail, held = trained["b"], trained["head"], trained["tail"], trained["held"]
    assert trained["seconds"] < 60 and b.history["steps"] == 100
    ours = bn.evaluate(b, head, tail, held)
    int8, int4, int2 = int_k_points(head, tail, held)
    assert ours["images"] == len(held) == 15
    assert ours["bytes_mean"] < int8["bytes_mean"] / 4, (ours, int8)
    assert ours["agreement"] >= 0.9 and ours["agreement"] >= int2["agreement"], (ours, int2)
    assert ours["bytes_p95"] >= ours["bytes_mean"] * 0.9


@pytest.mark.slow  # trains a bottleneck
def test_artifacts_round_trip_without_pickle(trained: dict, tmp_path: Path) -> None:
    b = trained["b"]
    feats = bn.cut_features(trained["head"], trained["held"][:3])
    desc = bn.save(b, tmp_path, {"fingerprint": "f" * 64, "source": "resnet18"})
    assert desc["cut"] == {"index": b.cut[0], "name": CUT} and desc["architecture"]["latent"] == 8
    edge, cloud = bn.load(tmp_path, "edge"), bn.load(tmp_path, "cloud")
    data = edge.encode(feats)
    assert data == b.encode(feats)  # the edge's copy codes the same bits
    assert torch.equal(cloud.decode(data, 3), b.decode(data, 3))
    fp = bn.fingerprint(tmp_path)
    assert fp == bn.fingerprint(tmp_path) and len(fp) == 64
    # a changed weight file is caught, and so is a changed base model
    desc_path = tmp_path / bn.artifacts.DESCRIPTION
    other = json.loads(desc_path.read_text())
    other["base"]["fingerprint"] = "0" * 64
    desc_path.write_text(json.dumps(other))
    assert bn.fingerprint(tmp_path) != fp
    edge_file = tmp_path / bn.artifacts.EDGE_FILE
    raw = bytearray(edge_file.read_bytes())
    raw[-1] ^= 1
    edge_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        bn.load(tmp_path, "edge")
    (tmp_path / bn.artifacts.DESCRIPTION).write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        bn.load(tmp_path)


def _affine_at_avgpool():
    """The small classifier, its images and split, traced and split at the pooled vector, and an
    affine bottleneck's config there (one thread: the tests' timings and budgets assume it)."""
    torch.set_num_threads(1)
    model = small.classifier()
    x, _, _ = small.images()
    train_idx, held_idx = small.split()
    graph = trace(model, x[:1])
    head, tail = graph.split("avgpool")
    config = bn.BottleneckConfig(channels=512, latent=512, kind="affine")
    return model, x, train_idx, held_idx, graph, head, tail, config


@pytest.mark.slow  # trains a bottleneck
def test_an_affine_bottleneck_at_the_pooled_vector_codes_each_channel_and_round_trips(tmp_path: Path) -> None:
    """kind affine: a step and offset per channel (2C parameters), steps scaled by the classifier's
    column norms, tables from the training latents; fewer bytes than int8 + zstd, same answers,
    and the artifacts rebuild the same encoder and decoder (a served model traces through them)."""
    from partitioner.bottleneck.served import LATENT_CUT, with_bottleneck
    from partitioner.models import fingerprint

    model, x, train_idx, held_idx, graph, head, tail, config = _affine_at_avgpool()
    b = bn.train(
        head,
        tail,
        bn.augment(x[train_idx], 3, seed=1),
        config,
        bn.TrainConfig(
            rate_weight=0.5, max_steps=40, budget_s=50, margin_weight=1.0, mixup=0.5, temperature=0.5, dead_zone=0.1
        ),
        cut=(graph.cut("avgpool").index, "avgpool"),
    )
    assert sum(p.numel() for p in b.encoder.parameters()) == 2 * 512
    ours = bn.evaluate(b, head, tail, x[held_idx])
    int8 = int_k_points(head, tail, x[held_idx])[0]
    assert ours["bytes_mean"] < int8["bytes_mean"] / 2 and ours["agreement"] >= 0.9, (ours, int8)
    assert ours["payload_bytes_mean"] < ours["bytes_mean"]  # the message header is counted too
    desc = bn.save(b, tmp_path, {"fingerprint": fingerprint(model), "source": "rn", "input_shape": list(small.SHAPE)})
    assert desc["architecture"]["kind"] == "affine" and desc["architecture"]["encoder"] == "AffineEncoder"
    edge, cloud = bn.load(tmp_path, "edge"), bn.load(tmp_path, "cloud")
    feats = bn.cut_features(head, x[held_idx][:3])
    data = edge.encode(feats)
    assert data == b.encode(feats) and torch.equal(cloud.decode(data, 3), b.decode(data, 3))
    assert float(edge.encoder.dead_zone) == pytest.approx(0.1)  # set after training, shipped to the edge
    costs = BottleneckEngine._costs(b, head, x[:1])
    assert costs["encoder_macs"] == costs["decoder_macs"] == 512  # one multiply-add per channel each way
    served = with_bottleneck(model, x[:1], tmp_path)
    assert LATENT_CUT in [c.name for c in trace(served, x[:1]).cuts]
    with torch.inference_mode():
        out = tail(b.reconstruct(torch.round(b.encoder(feats))))
        out = out if isinstance(out, torch.Tensor) else out[0]
        assert torch.allclose(served(x[held_idx][:3]), out, atol=1e-5)
    with pytest.raises(ValueError, match="bottleneck.latent"):
        bn.BottleneckConfig(channels=512, latent=8, kind="affine")
    with pytest.raises(ValueError, match="bottleneck.kind"):
        bn.BottleneckConfig(channels=512, kind="nonesuch")


def test_fixed_steps_train_nothing_decode_at_bin_centres_and_round_trip(tmp_path: Path) -> None:
    """levels: an untrained affine bottleneck (each channel's step the largest training feature /
    levels, over its importance), with a dead zone the decoder mirrors; it still sends under half
    int8's bytes at the same answers, its artifacts rebuild it on both sides, and the cloud's
    decode refuses a corrupt bitstream."""
    import zlib

    from compressor import codec
    from partitioner.bottleneck.served import with_bottleneck
    from partitioner.bottleneck.train import _ENTROPY
    from partitioner.models import fingerprint

    model, x, train_idx, held_idx, graph, head, tail, config = _affine_at_avgpool()
    train_x = bn.augment(x[train_idx], 3, seed=1)
    b = bn.train(
        head,
        tail,
        train_x,
        config,
        bn.TrainConfig(levels=12, dead_zone=0.2),
        cut=(graph.cut("avgpool").index, "avgpool"),
    )
    assert b.history["steps"] == 0 and b.history["levels"] == 12
    feats = bn.cut_features(head, train_x)
    importance = bn.channel_importance(tail, feats)
    step = float(feats.amax()) / 12 / (importance / importance.mean()).clamp(0.25, 4)
    for m in (b.encoder, b.decoder):
        assert torch.allclose(m.log_step.exp(), step, rtol=1e-5) and not m.offset.any()
    ours = bn.evaluate(b, head, tail, x[held_idx])
    int8 = int_k_points(head, tail, x[held_idx])[0]
    assert ours["bytes_mean"] < int8["bytes_mean"] / 2 and ours["agreement"] >= 0.9, (ours, int8)
    symbols = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(128).reshape(1, 512, 1, 1)
    centre = (symbols + 0.2 * symbols.sign()) * step.reshape(1, -1, 1, 1)
    assert torch.allclose(b.reconstruct(symbols), centre, rtol=1e-5)  # n > 0 decodes at n + 0.2 steps
    bn.save(b, tmp_path, {"fingerprint": fingerprint(model), "source": "rn", "input_shape": list(small.SHAPE)})
    edge, cloud = bn.load(tmp_path, "edge"), bn.load(tmp_path, "cloud")
    assert float(edge.encoder.dead_zone) == float(cloud.decoder.dead_zone) == pytest.approx(0.2)
    held = bn.cut_features(head, x[held_idx][:3])
    data = edge.encode(held)
    assert data == b.encode(held) and torch.equal(cloud.decode(data, 3), b.decode(data, 3))
    served = with_bottleneck(model, x[:1], tmp_path)
    with torch.inference_mode():
        out = tail(b.reconstruct(torch.round(b.encoder(held))))
        assert torch.allclose(served(x[held_idx][:3]), out if isinstance(out, torch.Tensor) else out[0], atol=1e-5)
    good = codec.encode(torch.round(edge.encoder(held[:1])), _ENTROPY, edge.tables)
    assert torch.equal(torch.as_tensor(codec.decode(good, tables=cloud.tables)), torch.round(edge.encoder(held[:1])))
    for payload, field in ((good.payload + good.payload, "more data"), (good.payload[:-2], "32-bit words")):
        bad = type(good)()
        bad.CopyFrom(good)
        bad.payload, bad.payload_size, bad.crc32 = payload, len(payload), zlib.crc32(payload)
        with pytest.raises(CodecError, match=field):
            codec.decode(bad, tables=cloud.tables)
    with pytest.raises(ValueError, match="bottleneck.levels"):
        bn.train(head, tail, train_x[:4], bn.BottleneckConfig(channels=512), bn.TrainConfig(levels=12))
    with pytest.raises(ValueError, match="bottleneck.levels"):
        bn.TrainConfig(levels=0.5)


def test_the_served_model_clamps_the_latent_into_the_tables_as_the_wire_does(tmp_path: Path) -> None:
    """A latent value outside the coder's tables reaches the cloud clamped (the wire codes only the
    tables' symbols); the model run whole must decode the same values, or a local run and a split
    run answer differently."""
    from compressor import codec
    from partitioner.bottleneck.served import with_bottleneck
    from partitioner.models import fingerprint

    torch.set_num_threads(1)
    model = small.classifier()
    x, _, _ = small.images()
    graph = trace(model, x[:1])
    head, tail = graph.split("avgpool")
    config = bn.BottleneckConfig(channels=512, latent=512, kind="affine")
    encoder, decoder = make_modules(config)
    with torch.no_grad():  # a fine step: the latent spans tens of symbols, the tables only -2..2
        for m in (encoder, decoder):
            m.log_step.fill_(float(np.log(0.02)))
    t = EntropyTables(pmf=np.ones((512, 5)), offset=-2)
    b = bn.Bottleneck(config, (512, 1, 1), encoder.eval(), decoder.eval(), FactorizedPrior(512), t)
    b.cut = (graph.cut("avgpool").index, "avgpool")
    bn.save(b, tmp_path, {"fingerprint": fingerprint(model), "source": "rn", "input_shape": list(small.SHAPE)})
    served = with_bottleneck(model, x[:1], tmp_path)
    with torch.inference_mode():
        feats = bn.cut_features(head, x[:4])
        latent = torch.round(encoder(feats))
        assert latent.abs().max() > 2  # the tables cannot code these: the wire clamps them
        msg = codec.encode(latent, EncodingSpec(encoding="entropy", codec="none"), t)
        wire = tail(decoder(codec.decode(msg, tables=t)))
        wire = wire if isinstance(wire, torch.Tensor) else wire[0]
        assert torch.allclose(served(x[:4]), wire, atol=1e-5)


def test_entropy_messages_carry_a_short_header_and_old_frames_still_decode() -> None:
    """dtype (FLOAT32), codec (NONE) and raw_size (= payload_size) are implied by the encoding and
    left off the wire; frames that carry them still decode, and the bounds hold either way."""
    from compressor import codec
    from protos.cleave.v1 import tensor_pb2

    t = tables(channels=8)
    rng = np.random.default_rng(2)
    latent = rng.integers(-4, 5, size=(1, 8, 1, 1)).astype(np.float32)
    msg = codec.encode(latent, EncodingSpec(encoding="entropy", codec="none"), t)
    assert (msg.dtype, msg.codec, msg.raw_size) == (0, 0, 0) and msg.payload_size == len(msg.payload)
    old = tensor_pb2.Tensor()
    old.CopyFrom(msg)
    old.dtype, old.codec, old.raw_size = tensor_pb2.FLOAT32, tensor_pb2.NONE, len(msg.payload)
    assert old.ByteSize() - msg.ByteSize() == 2 + 2 + 2  # three fields of 2 bytes each at this size
    for frame in (msg, old):
        assert codec.check_header(frame) == ("float32", (1, 8, 1, 1))
        assert np.array_equal(codec.decode_array(frame, tables=t), latent)
    huge = tensor_pb2.Tensor()
    huge.CopyFrom(msg)
    huge.payload = b"\0" * (max_payload(latent.shape) + 4)
    huge.payload_size = len(huge.payload)
    with pytest.raises(CodecError, match="tensor.payload_size: .* symbols can take"):
        codec.check_header(huge)
    lying = tensor_pb2.Tensor()
    lying.CopyFrom(msg)
    lying.raw_size = len(msg.payload) + 4
    with pytest.raises(CodecError, match="tensor.payload_size"):
        codec.check_header(lying)
    zstd = tensor_pb2.Tensor()
    zstd.CopyFrom(msg)
    zstd.codec = tensor_pb2.ZSTD
    with pytest.raises(CodecError, match="codec NONE"):
        codec.check_header(zstd)
    other = tensor_pb2.Tensor()
    other.CopyFrom(old)
    other.encoding, other.dtype = tensor_pb2.RAW, 0
    with pytest.raises(CodecError, match="tensor.dtype"):  # only ENTROPY implies its dtype
        codec.check_header(other)


def test_the_affine_dead_zone_rounds_towards_zero_and_old_artifacts_load_without_one(tmp_path: Path) -> None:
    config = bn.BottleneckConfig(channels=4, latent=4, kind="affine")
    encoder, decoder = make_modules(config)
    y = torch.tensor([0.55, 1.55, 1.65, -0.55]).reshape(1, 4, 1, 1)
    assert torch.round(encoder(y)).flatten().tolist() == [1, 2, 2, -1]  # none while training: plain rounding
    encoder.dead_zone.fill_(0.1)
    assert torch.round(encoder(y)).flatten().tolist() == [0, 1, 2, 0]  # up only past n + 0.5 + 0.1
    t = bn.empirical_tables(np.zeros((3, 4, 1, 1), np.int64), half_width=4, low=-1)
    b = bn.Bottleneck(config, (4, 1, 1), encoder, decoder, FactorizedPrior(4), t, (1, "x"))
    bn.save(b, tmp_path, {"fingerprint": "f" * 64, "source": "t"})
    assert float(bn.load(tmp_path).encoder.dead_zone) == pytest.approx(0.1) and bn.load(tmp_path).tables.offset == -1
    from safetensors.torch import load_file, save_file

    edge = tmp_path / bn.artifacts.EDGE_FILE  # as written before the dead zone existed
    save_file({k: v for k, v in load_file(str(edge)).items() if k != "encoder.dead_zone"}, str(edge))
    desc = json.loads((tmp_path / bn.artifacts.DESCRIPTION).read_text())
    desc["sha256"][bn.artifacts.EDGE_FILE] = bn.artifacts._sha256(edge)
    (tmp_path / bn.artifacts.DESCRIPTION).write_text(json.dumps(desc))
    assert float(bn.load(tmp_path, "edge").encoder.dead_zone) == 0
    cloud = tmp_path / bn.artifacts.CLOUD_FILE  # a decoder from before it decodes at n steps
    save_file({k: v for k, v in load_file(str(cloud)).items() if k != "decoder.dead_zone"}, str(cloud))
    desc["sha256"][bn.artifacts.CLOUD_FILE] = bn.artifacts._sha256(cloud)
    (tmp_path / bn.artifacts.DESCRIPTION).write_text(json.dumps(desc))
    assert float(bn.load(tmp_path, "cloud").decoder.dead_zone) == 0
    with pytest.raises(ValueError, match="bottleneck.dead_zone"):
        bn.TrainConfig(dead_zone=0.5)


def test_channel_importance_of_a_linear_tail_is_its_column_norm() -> None:
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 40)
    fc.weight.data[:, :4] *= 5  # four channels the logits lean on
    tail = torch.nn.Sequential(torch.nn.Flatten(), fc)
    imp = bn.channel_importance(tail, torch.rand(64, 16, 1, 1), probes=200)
    assert torch.allclose(imp, fc.weight.norm(dim=0), rtol=0.2)
    assert imp[:4].min() > 2 * imp[4:].max()


def test_empirical_tables_keep_unseen_symbols_codable() -> None:
    symbols = np.repeat(np.arange(201) % 3 - 1, 3).reshape(201, 3, 1, 1)  # -1, 0, 1 equally often
    symbols[:, 0] = 0  # a channel training always sent as 0
    t = bn.empirical_tables(symbols, half_width=4)
    assert t.offset == -4 and t.symbols == 9 and t.channels == 3
    zero, four = np.zeros((1, 3, 1, 1), np.int64), np.full((1, 3, 1, 1), 4)
    above = bn.empirical_tables(symbols + 1, half_width=4, low=-1)  # never below 0: no room there
    assert above.offset == -1 and above.symbols == 6
    assert above.bits(np.ones((1, 3, 1, 1), np.int64)) < t.bits(zero)  # less mass spent on the unseen
    assert t.bits(zero) < 2 * np.log2(3) + 0.1 and 20 < t.bits(four) < 3 * 24  # 0 is nearly free on channel 0
    assert np.array_equal(decode_symbols(encode_symbols(four, t), t, four.shape), four)


def engine_context(tmp_path: Path, opts: pb.BottleneckOptions) -> JobContext:
    """A bottleneck job on the small classifier (a safetensors upload) with the tinted photos as
    its dataset, ordered so that the held-out tail of the dataset is photos training never saw."""
    from safetensors.torch import save_file

    model = small.classifier()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    x, y, _ = small.images()
    train_idx, held_idx = small.split()
    order = train_idx + held_idx
    np.savez(tmp_path / "data.npz", inputs=x[order].numpy(), labels=y[order].numpy())
    source = ModelSource(
        upload_path=str(tmp_path / "model.safetensors"),
        upload_format="SAFETENSORS",
        upload_meta={"architecture": "resnet18", "num_classes": 4, "input_shape": list(small.SHAPE)},
    )
    work = tmp_path / "work"
    work.mkdir()
    seen: list[tuple[float, str]] = []
    ctx = JobContext(
        spec=pb.JobSpec(engine="bottleneck", bottleneck=opts),
        source=source,
        workdir=work,
        dataset_path=str(tmp_path / "data.npz"),
        dataset_format="npz",
        on_progress=lambda f, s: seen.append((f, s)),
    )
    ctx.seen = seen  # type: ignore[attr-defined]
    return ctx


@pytest.mark.slow  # trains a bottleneck
def test_engine_reports_bytes_agreement_costs_and_a_curve(tmp_path: Path) -> None:
    opts = pb.BottleneckOptions(cuts=[CUT], rate_weights=[0.02], budget_s=15, holdout=0.3, augment=3)
    ctx = engine_context(tmp_path, opts)
    get_engine("bottleneck").run(ctx)
    r = ctx.report
    names = [n for n, _ in ctx.artifacts]
    assert names[:3] == [bn.artifacts.DESCRIPTION, bn.artifacts.EDGE_FILE, bn.artifacts.CLOUD_FILE]
    assert "curve.json" in names and "curve.png" in names
    best = r["best"]
    assert r["images"] == "dataset" and r["held_out_images"] == 15 and r["train_images"] == 35 * 4
    assert best["cut"] == CUT and best["encoder_macs"] > 0 and best["edge_ms"] > 0 and best["train_seconds"] <= 16
    assert best["bytes_mean"] < r["int8_at_best_cut"]["bytes_mean"] / 4 and r["bytes_vs_int8"] < 0.25
    assert best["agreement"] >= 0.9
    curve = json.loads((ctx.workdir / "curve.json").read_text())
    methods = {p["method"] for p in curve["points"]}
    assert {"int8+zstd", "int4+zstd", "jpeg50", f"bottleneck@{CUT}/w0.02"} <= methods
    fractions = [f for f, _ in ctx.seen]
    assert fractions == sorted(fractions) and any("step" in s for _, s in ctx.seen)
    loaded = bn.load(ctx.workdir)
    assert loaded.cut[1] == CUT and r["bottleneck_fingerprint"] == bn.fingerprint(ctx.workdir)


def test_engine_options_are_checked_by_field(tmp_path: Path) -> None:
    for opts, field in (
        (pb.BottleneckOptions(holdout=1.5), "bottleneck.holdout"),
        (pb.BottleneckOptions(stride=3), "bottleneck.stride"),
        (pb.BottleneckOptions(rate_weights=[-1]), "bottleneck.rate_weights"),
        (pb.BottleneckOptions(cuts=["nonesuch"]), "nonesuch"),
        (pb.BottleneckOptions(cuts=["fc"]), "one .N, C, H, W. tensor"),
        (pb.BottleneckOptions(kind="nonesuch"), "bottleneck.kind"),
        (pb.BottleneckOptions(kind="affine", stride=2), "bottleneck.stride"),
        (pb.BottleneckOptions(mixup=1.5), "bottleneck.mixup"),
        (pb.BottleneckOptions(margin_weight=-1), "bottleneck.margin_weight"),
        (pb.BottleneckOptions(temperature=-1), "bottleneck.temperature"),
        (pb.BottleneckOptions(levels=[12]), "bottleneck.levels"),  # fixed steps: affine only
        (pb.BottleneckOptions(kind="affine", levels=[0.5]), "bottleneck.levels"),
        (pb.BottleneckOptions(kind="affine", dead_zone=0.5), "bottleneck.dead_zone"),
    ):
        with pytest.raises((ValueError, KeyError), match=field):
            d = tmp_path / str(len(list(tmp_path.iterdir())))
            d.mkdir()
            get_engine("bottleneck").run(engine_context(d, opts))


def _wait(m: JobManager, job_id: str, ok, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = m.get(job_id)
        if ok(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never got there: {m.get(job_id)}")


@pytest.mark.slow  # trains a bottleneck
def test_a_training_job_cancels_and_survives_a_restart_like_any_job(tmp_path: Path) -> None:
    spec = pb.JobSpec(
        engine="bottleneck",
        model=pb.ModelRef(torchvision="resnet18", input_shape=list(small.SHAPE), num_classes=4),
        bottleneck=pb.BottleneckOptions(cuts=[CUT], budget_s=300, max_images=20),
    )
    training = lambda j: j.state == RUNNING and "step" in j.stage  # noqa: E731
    m = JobManager(JobsConfig(dir=str(tmp_path)))
    m.start()
    try:
        with pytest.raises(InvalidArgument, match="spec.bottleneck.holdout"):
            m.submit(pb.JobSpec(engine="bottleneck", model=spec.model, bottleneck=pb.BottleneckOptions(holdout=2)))
        job = m.submit(spec)
        assert job.engine == "bottleneck"
        _wait(m, job.id, training)
    finally:
        m.close()  # the daemon shuts down mid-training
    m = JobManager(JobsConfig(dir=str(tmp_path)))
    requeued = m.get(job.id)
    assert requeued.state == QUEUED and "re-queued" in requeued.message
    m.start()
    try:
        again = _wait(m, job.id, training)
        assert again.progress < 0.9
        assert m.cancel(job.id).state == "CANCELLED"
        done = _wait(m, job.id, lambda j: j.state == "CANCELLED" and not list(m.store.tmp_dir.iterdir()), 30)
        assert not done.artifacts
    finally:
        m.close()


def test_cli_builds_a_bottleneck_spec() -> None:
    from cleave_cli.compress_cmd import build_spec
    from cleave_cli.main import build_parser

    flags = "--cuts add_3,add_8 --rate-weights 0.01,0.1 --latent 12 --stride 2 --budget 90"
    argv = ["compress", "--model", "efficientnet_lite0_pretrained", "--engine", "bottleneck", *flags.split(" ")]
    args = build_parser().parse_args(argv)
    opts = build_spec(args).bottleneck
    assert list(opts.cuts) == ["add_3", "add_8"] and list(opts.rate_weights) == pytest.approx([0.01, 0.1])
    assert (opts.latent, opts.stride, opts.budget_s) == (12, 2, 90)
    argv = [*argv[:5], "--kind", "affine", "--temperature", "0.5", "--margin-weight", "2", "--mixup", "0.5"]
    argv += ["--levels", "12,14", "--dead-zone", "0.25"]
    opts = build_spec(build_parser().parse_args(argv)).bottleneck
    assert (opts.kind, opts.temperature, opts.margin_weight, opts.mixup) == ("affine", 0.5, 2, 0.5)
    assert list(opts.levels) == [12, 14] and opts.dead_zone == 0.25
    auto = build_parser().parse_args(["compress", "--model", "resnet18", "--engine", "bottleneck", "--cuts", "auto"])
    assert list(build_spec(auto).bottleneck.cuts) == []


def test_auto_cuts_are_single_image_tensors_early_in_the_model() -> None:
    from cloud_node.jobs.bottleneck_engine import AUTO_CUTS, _auto_cuts

    x, _, _ = small.images()
    graph = trace(small.classifier(), x[:1])
    cuts = _auto_cuts(graph)
    last = max(c.index for c in graph.cuts)
    assert len(cuts) == AUTO_CUTS
    assert all(len(c.live) == 1 and len(c.shapes[0]) == 4 and 0 < c.index < 2 * last / 3 for c in cuts)
    others = [c for c in graph.cuts if c not in cuts and len(c.live) == 1 and len(c.shapes[0]) == 4]
    assert max(c.nbytes for c in cuts) <= min(c.nbytes for c in others if 0 < c.index < 2 * last / 3)


def test_training_pool_never_holds_a_held_out_photo_and_crops_are_seeded() -> None:
    from partitioner.bottleneck import data

    everything = dict(data.pool())
    pool = data.pool(held_out=["retina", "china", "flower"])
    names = [n for n, _ in pool]
    assert not {"retina", "china", "flower"} & set(names) and len(names) == len(everything) - 3
    assert len(names) >= 20 and all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for _, p in pool)
    held_pixels = [everything[n] for n in ("retina", "china", "flower")]
    assert not any(p.shape == h.shape and np.array_equal(p, h) for _, p in pool for h in held_pixels)
    with pytest.raises(ValueError, match="held_out"):
        data.pool(held_out=["nonesuch"])
    a = data.random_crops(pool, (1, 3, 32, 32), 24, seed=3)
    assert torch.equal(a, data.random_crops(pool, (1, 3, 32, 32), 24, seed=3))  # reproducible
    assert a.shape == (24, 3, 32, 32) and not torch.equal(a, data.random_crops(pool, (1, 3, 32, 32), 24, seed=4))
    assert len({tuple(x.flatten()[:64].tolist()) for x in a}) == 24  # distinct crops


def test_benchmark_goals_pick_the_cheapest_point_within_a_point_and_say_among_how_many() -> None:
    from benchmarks.bottleneck import goals

    def pt(family: str, nbytes: float, agreement: float, cut: str | None = "pool") -> dict:
        return {
            "family": family,
            "method": f"{family}-{nbytes}",
            "bytes_mean": nbytes,
            "agreement": agreement,
            "cut": cut,
        }

    points = [
        pt("bottleneck", 339.0, 1.0),
        pt("bottleneck", 179.0, 1.0),
        pt("bottleneck", 122.0, 13 / 15),  # cheaper, but 2 of 15 lost: not within a point
        pt("int-k+zstd at the cut", 319.0, 1.0),
        pt("int-k+zstd at the cut", 200.0, 0.9),
        pt("JPEG input (cloud-only)", 37240.0, 1.0, None),
    ]
    g = goals(points)["per_cut"]["pool"]
    assert g["bottleneck"]["bytes_mean"] == 179.0
    assert g["points_tried"] == 3
    assert g["ratio_vs_best_int_k"] == round(179 / 319, 4)
    assert not g["goal_vs_int_k_met"] and g["goal_vs_jpeg_met"]
    points[1]["bytes_mean"] = 159.0
    assert goals(points)["per_cut"]["pool"]["goal_vs_int_k_met"]


def test_fold_benchmark_configs_name_train_config_fields() -> None:
    from benchmarks.bottleneck_folds import parse_config

    assert parse_config("1.5") == {"rate_weight": 1.5}
    cfg = parse_config("2:0:0.5")
    assert cfg == {"rate_weight": 2.0, "feature_weight": 0.0, "temperature": 0.5}
    assert bn.TrainConfig(**cfg).temperature == 0.5
    with pytest.raises(ValueError, match="--configs"):
        parse_config("1:2:3:4")
    assert parse_config("L13:0.2") == {"levels": 13.0, "dead_zone": 0.2}
    assert bn.TrainConfig(**parse_config("L13")).levels == 13
    with pytest.raises(ValueError, match="--configs"):
        parse_config("L1:2:3")


def test_fold_benchmark_picks_the_cheapest_config_at_the_reference_agreement() -> None:
    from benchmarks.bottleneck_folds import pick

    rows = [
        {"method": "int3t+zstd", "agree": 80, "bytes_mean": 300.0},
        {"method": "affine L10", "agree": 79, "bytes_mean": 150.0},  # cheaper, one crop short: not it
        {"method": "affine L13 dead_zone=0.2", "agree": 80, "bytes_mean": 180.0},
        {"method": "affine L13", "agree": 82, "bytes_mean": 200.0},
    ]
    assert pick(rows)["method"] == "affine L13 dead_zone=0.2"
    assert pick(rows[:2]) is None and pick(rows[1:]) is None  # none reaches it, or no reference
