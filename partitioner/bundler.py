"""Build an edge bundle (see :mod:`partitioner.bundle`) from a model spec: needs torch and onnx.

Everything a torch-free edge cannot compute itself is computed here, once, with the same code
the torch edge runs at start-up (:class:`~edge_node.autoplan.AutoPlanner`): the profile, the bytes
of every encoding at every cut (:meth:`CostModel.measure`), the distortion of every candidate
(:func:`~partitioner.planner.distortion_meter`), the ONNX exports and ONNX Runtime's int8 heads
(:func:`~partitioner.quantized_head.build_quantized_head`).
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .bundle import MANIFEST, PLANNING, BundleCut, EdgeBundle, FileEntry, Manifest, PlanningTables, sha256_file
from .costmodel import FEATURE_ENCODINGS, INPUT_ENCODINGS, CostModel
from .graph import Cut
from .loaded import LoadedModel, as_tensor_list
from .photos import calibration_inputs
from .placement import Placement
from .planner import Planner, cached_distortion, distortion_meter, head_tail_distortion
from .profile import cached_profile
from .quantized_head import _export_onnx, build_quantized_head

#: Candidate cuts a bundle carries unless told which: each float head holds the weights before it.
DEFAULT_MAX_CUTS = 6


def candidate_cuts(model: LoadedModel, max_cuts: int = DEFAULT_MAX_CUTS) -> list[Cut]:
    """The cuts worth shipping: those that send less than the input and every earlier cut (a later
    cut that sends more costs more edge compute *and* more bytes, so no plan picks it), then at most
    ``max_cuts`` of them spread over the model."""
    useful, smallest = [], model.graph.cuts[0].nbytes
    for cut in model.graph.cuts:
        if cut.index == 0 or not all(d == "float32" for d in cut.dtypes):
            continue
        if cut.nbytes < smallest:
            useful.append(cut)
            smallest = cut.nbytes
    if len(useful) <= max_cuts:
        return useful
    step = (len(useful) - 1) / (max_cuts - 1)
    return [useful[round(i * step)] for i in range(max_cuts)]


def build_bundle(
    model: LoadedModel,
    out: str | Path,
    cuts: Sequence[int | str] | None = None,
    *,
    max_cuts: int = DEFAULT_MAX_CUTS,
    calibration: str | None = None,
    calibration_inputs_n: int = 8,
    byte_samples: int = 3,
    progress: Callable[[str], None] | None = None,
) -> EdgeBundle:
    """Write ``model``'s bundle into directory ``out`` (created; must be empty or absent) and return it opened.

    ``cuts``: candidate cuts by name or index (default :func:`candidate_cuts`). ``calibration``
    and ``calibration_inputs_n``: the images distortion and bytes are measured on (as the edge's
    ``autoplan.calibration`` / ``calibration_inputs``); ``byte_samples`` of them predict bytes.
    """
    say = progress or (lambda _msg: None)
    if model.entropy_tables is not None:
        raise ValueError("model: a model with a learned bottleneck cannot be bundled (its entropy coder needs torch)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} exists and is not empty")
    try:
        chosen = [model.graph.cut(c) for c in cuts] if cuts else candidate_cuts(model, max_cuts)
    except KeyError as exc:  # a cut the model does not have: the line saying why, not a traceback
        raise ValueError(f"cuts: {exc.args[0]}") from None
    if any(c.index == 0 for c in chosen):
        raise ValueError("cuts: cut 0 is the input (cloud-only needs no head); name split points")
    chosen = sorted({c.index: c for c in chosen}.values(), key=lambda c: c.index)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cuts").mkdir(parents=True)
    try:
        files: dict[str, FileEntry] = {}

        def put(name: str, data: bytes) -> str:
            (tmp / name).write_bytes(data)
            files[name] = FileEntry(sha256_file(tmp / name), len(data))
            return name

        example = model.graph.example_input
        calib = calibration_inputs(model.spec, calibration, calibration_inputs_n)
        with torch.inference_mode():
            outputs = len(as_tensor_list(model.module(example)))
        say("exporting the whole model")
        whole = put("model.onnx", _export_onnx(model.module, example, outputs))
        bundle_cuts, int8_heads = [], {}
        for cut in chosen:
            say(f"exporting the heads at {cut.name} (#{cut.index})")
            _, head, _ = model.parts(cut)
            float_head = put(f"cuts/{cut.index}.onnx", _export_onnx(head, example, len(cut.live)))
            int8 = int8_heads[cut.index] = build_quantized_head(head, calib, threads=1)
            int8_head = put(f"cuts/{cut.index}.int8.onnx", int8.onnx_bytes)
            bundle_cuts.append(
                BundleCut(
                    cut.index, cut.name, cut.live, tuple(map(tuple, cut.shapes)), cut.dtypes, float_head, int8_head
                )
            )
        say("profiling, measuring bytes and distortion on the calibration images")
        tables = planning_tables(model, chosen, calib, calibration, byte_samples, int8_heads)
        planning = put(PLANNING, tables.to_json().encode())
        manifest = Manifest(
            name=model.name,
            fingerprint=model.fingerprint,
            input_shape=tuple(model.input_shape),
            input_dtype=str(example.dtype).removeprefix("torch."),
            outputs=outputs,
            whole=whole,
            planning=planning,
            cuts=tuple(bundle_cuts),
            files=files,
            source=model.spec.source,
            built_with=_versions(),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EdgeBundle.open(out, expect_fingerprint=model.fingerprint)


def planning_tables(
    model: LoadedModel,
    cuts: Sequence[Cut],
    calib: torch.Tensor,
    calibration: str | None,
    byte_samples: int,
    int8_heads: Mapping[int, Callable] | None = None,
) -> PlanningTables:
    """The planner's inputs for ``cuts``: what :meth:`AutoPlanner.prepare` measures with torch.

    ``int8_heads``: the bundle's int8 head at each of ``cuts`` (by index); the splits' distortion is
    measured through them too (``distortion_int8``)."""
    profile = cached_profile(model, role="edge")
    cost = CostModel.measure(model, profile, profile, calib[:byte_samples], cache=True)
    keep = {0} | {c.index for c in cuts}
    costs = [replace(c, edge_ms=0.0, cloud_ms=0.0, encode_ms={}, decode_ms={}) for c in cost.cuts if c.index in keep]
    meter = cached_distortion(distortion_meter(model, calib, record=True), model, calib)
    planner = Planner(cost, distortion=meter, input_is_8bit=False)  # int8c measured too
    through_int8 = None if int8_heads is None else head_tail_distortion(model, calib, head_at=int8_heads.__getitem__)
    distortion: dict[str, tuple[float, float]] = {}
    distortion_int8: dict[str, tuple[float, float]] = {}
    for candidate in (c for c in planner.candidates if c.cut_index in keep):
        key = f"{candidate.cut_index}|{candidate.encoding}"
        if not planner.lossless(candidate):
            d = meter(candidate)
            distortion[key] = (d.rel_error, d.top1)
        if through_int8 is None:
            continue
        if candidate.kind == Placement.SPLIT:  # through its int8 head, float32 features too: no split is lossless
            d = through_int8(candidate)
            distortion_int8[key] = (d.rel_error, d.top1)
        elif key in distortion:  # cloud-only runs no head: the float table's entry
            distortion_int8[key] = distortion[key]
    return PlanningTables(
        fingerprint=model.fingerprint,
        profile=profile,
        costs=costs,
        output_bytes=cost.output_bytes,
        reply_bytes=cost.reply_bytes,
        edge_model_memory=cost.edge_model_memory,
        distortion=distortion,
        distortion_int8=None if through_int8 is None else distortion_int8,
        calibration={
            "source": calibration or ("photos" if model.spec.pretrained else "synthetic"),
            "inputs": len(calib),
            "byte_samples": byte_samples,
            "feature_encodings": list(FEATURE_ENCODINGS),
            "input_encodings": list(INPUT_ENCODINGS),
        },
    )


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def describe(bundle: EdgeBundle) -> dict:
    """A bundle's summary, for the CLI."""
    m = bundle.manifest
    return {
        "path": str(bundle.root),
        "model": m.name,
        "fingerprint": m.fingerprint,
        "input_shape": list(m.input_shape),
        "cuts": [{"index": c.index, "name": c.name, "features": [list(s) for s in c.shapes]} for c in m.cuts],
        "files": len(m.files),
        "bytes": bundle.size_bytes,
    }


__all__ = ["DEFAULT_MAX_CUTS", "build_bundle", "candidate_cuts", "describe", "planning_tables"]
