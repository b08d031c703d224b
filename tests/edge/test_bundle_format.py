"""An edge bundle is used only when every file is the one its manifest lists (torch-free, no daemons)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_node.autoplan import bundle_distortion
from partitioner.bundle import (
    MANIFEST,
    BundleCut,
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    EdgeBundle,
    FileEntry,
    Manifest,
    PlanningTables,
    sha256_file,
)
from partitioner.costmodel import CutCost, Link
from partitioner.planner import Planner
from partitioner.profile import CodecCost, Profile
from protos.errors import Unavailable

pytestmark = pytest.mark.edge

FP = "ab" * 32


def _profile(total_ms: float = 10.0) -> Profile:
    return Profile(
        model="m",
        fingerprint=FP,
        host="build",
        torch_version="x",
        threads=1,
        batch=1,
        node_names=["x", "a", "b", "out"],
        node_ms=[0.0, 2.0, 6.0, 2.0],
        output_bytes=[48, 32, 16, 8],
        head_ms={1: 2.0, 2: 8.0},
        total_ms=total_ms,
        codecs={"int8": CodecCost("int8", 1.0, 1.0)},
        input_shape=[1, 3, 2, 2],
    )


def write_bundle(root: Path, fingerprint: str = FP) -> Path:
    """A small, well-formed bundle (the ONNX files are stand-in bytes: the format does not parse them)."""
    (root / "cuts").mkdir(parents=True)
    files = {}

    def put(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        files[name] = FileEntry(sha256_file(root / name), len(data))
        return name

    whole = put("model.onnx", b"whole" * 100)
    cut = BundleCut(
        2, "b", ("b",), ((1, 4),), ("float32",), put("cuts/2.onnx", b"h" * 50), put("cuts/2.int8.onnx", b"q")
    )
    tables = PlanningTables(
        fingerprint=FP,
        profile=_profile(),
        costs=[
            CutCost(0, "x", 0, 0, 48, 0, 0, {"int8c": 20, "raw+none": 48}),
            CutCost(2, "b", 0, 0, 16, 100, 80, {"int8": 6, "raw": 16, "raw+none": 16}),
        ],
        output_bytes=8,
        reply_bytes=5,
        edge_model_memory=200,
        distortion={"2|int8": (0.01, 1.0)},
        calibration={"source": "synthetic", "inputs": 8},
    )
    planning = put("planning.json", tables.to_json().encode())
    manifest = Manifest("m", fingerprint, (1, 3, 2, 2), "float32", 1, whole, planning, (cut,), files)
    (root / MANIFEST).write_text(manifest.to_json())
    return root


def test_a_well_formed_bundle_opens_and_reads_back(tmp_path: Path) -> None:
    bundle = EdgeBundle.open(write_bundle(tmp_path / "b"), expect_fingerprint=FP)
    assert bundle.manifest.name == "m" and bundle.cut("b").index == 2 and bundle.cut(2).name == "b"
    assert bundle.read("cuts/2.onnx") == b"h" * 50
    assert bundle.planning().distortion == {"2|int8": (0.01, 1.0)}
    assert bundle.planning().reply_bytes == 5  # a lossy plan's coded reply, priced by the planner on the edge
    with pytest.raises(KeyError, match=r"b \(#2\)"):
        bundle.cut("nope")


@pytest.mark.parametrize(
    ("mutate", "error", "names"),
    [
        (lambda r: (r / "cuts/2.onnx").write_bytes(b"h" * 49 + b"X"), BundleIntegrityError, "cuts/2.onnx: sha256"),
        (lambda r: (r / "model.onnx").write_bytes(b"whole" * 99), BundleIntegrityError, "model.onnx: 495 bytes"),
        (lambda r: (r / "cuts/2.int8.onnx").unlink(), BundleIntegrityError, "cuts/2.int8.onnx: missing"),
        (lambda r: (r / "cuts/extra.onnx").write_bytes(b"x"), BundleIntegrityError, "not in the manifest: cuts/extra"),
        (lambda r: (r / MANIFEST).unlink(), BundleFormatError, "manifest.json: missing"),
        # With the bundle's path, as the other files': `cleave bundle --verify` printed "manifest.json: not JSON".
        (lambda r: (r / MANIFEST).write_text("{"), BundleFormatError, "/b/manifest.json: not JSON"),
    ],
)
def test_a_changed_truncated_missing_or_extra_file_is_refused_by_name(tmp_path, mutate, error, names) -> None:
    root = write_bundle(tmp_path / "b")
    mutate(root)
    with pytest.raises(error, match=names):
        EdgeBundle.open(root)


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda d: d.update(format="cleave.edge_bundle/9"), "/b/manifest.json: format"),
        (lambda d: d["model"].update(fingerprint="zz"), "model.fingerprint"),
        (lambda d: d["model"].pop("input_shape"), "model.input_shape"),
        (lambda d: d["cuts"][0].update(index=0), r"cuts\[0\].index"),
        (lambda d: d["cuts"][0].update(head="cuts/none.onnx"), r"cuts\[0\].head"),
        (lambda d: d["files"].update({"../escape": d["files"]["model.onnx"]}), "not a relative path inside"),
        (lambda d: d["files"]["model.onnx"].update(sha256="00" * 31), r"files\['model.onnx'\].sha256"),
    ],
)
def test_a_malformed_manifest_names_the_field(tmp_path: Path, edit, names) -> None:
    root = write_bundle(tmp_path / "b")
    _edit_manifest(root, edit)
    with pytest.raises(BundleFormatError, match=names):
        EdgeBundle.open(root)


def test_a_bundle_of_another_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not the expected"):
        EdgeBundle.open(write_bundle(tmp_path / "b"), expect_fingerprint="cd" * 32)
    # The manifest and the planning tables must agree too (a table from another model's bundle).
    with pytest.raises(BundleFormatError, match="planning.json: fingerprint"):
        EdgeBundle.open(write_bundle(tmp_path / "c", fingerprint="cd" * 32))


def test_a_file_changed_after_opening_is_refused_when_read(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    bundle = EdgeBundle.open(root)
    (root / "cuts/2.onnx").write_bytes(b"g" * 50)
    with pytest.raises(BundleIntegrityError, match="cuts/2.onnx: sha256"):
        bundle.read("cuts/2.onnx")


def test_the_planner_ranks_from_the_tables_without_torch(tmp_path: Path) -> None:
    """The cost model rebuilt from the tables: E(k) from the edge profile, C(k) from the cloud's."""
    tables = EdgeBundle.open(write_bundle(tmp_path / "b")).planning()
    cost = tables.cost_model(_profile(10.0), _profile(1.0), "m")
    assert [c.index for c in cost.cuts] == [0, 2]
    assert cost.cuts[1].feature_bytes["int8"] == 6 and cost.cuts[1].edge_ms == pytest.approx(8.0)
    planner = Planner(cost)
    slow, fast = Link(0.001, 0.001, 1.0), Link(1000.0, 1000.0, 0.1)
    assert planner.best(slow).candidate.label == "edge-only"  # nothing crosses a link this slow in time
    assert planner.best(fast).candidate.kind != planner.best(slow).candidate.kind


def _edit_planning(root: Path, edit) -> None:
    """Edit planning.json and record its new digest in the manifest (a well-formed bundle with other tables)."""
    path = root / "planning.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    _edit_manifest(
        root, lambda d: d["files"]["planning.json"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    )


def test_the_int8_heads_accuracy_table_is_read_and_checked_by_field(tmp_path: Path) -> None:
    # An edge serving the bundle's int8 heads plans with their accuracy (distortion_int8), not the float heads'.
    root = write_bundle(tmp_path / "b")
    _edit_planning(root, lambda d: d.update(distortion_int8={"2|int8": [0.2, 0.75], "2|raw": [0.1, 0.875]}))
    tables = EdgeBundle.open(root).planning()
    assert bundle_distortion(tables, 8) == {"2|int8": (0.2, 0.75), "2|raw": (0.1, 0.875)}
    assert bundle_distortion(tables, 32) == {"2|int8": (0.01, 1.0)}
    _edit_planning(root, lambda d: d["distortion_int8"].update({"2|raw": [0.1]}))
    with pytest.raises(BundleFormatError, match=r"distortion_int8\['2\|raw'\]"):
        EdgeBundle.open(root)


def test_a_bundle_without_the_int8_heads_accuracy_is_refused_for_int8_heads(tmp_path: Path) -> None:
    # Bundles built before it was measured still serve float heads; int8 heads would be planned on a guess.
    tables = EdgeBundle.open(write_bundle(tmp_path / "b")).planning()
    assert tables.distortion_int8 is None and bundle_distortion(tables, 32) == tables.distortion
    with pytest.raises(Unavailable, match="head.weight_bits: 8 .* rebuild it with `cleave bundle`"):
        bundle_distortion(tables, 8)
