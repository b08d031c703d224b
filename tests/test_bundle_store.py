"""The cloud's bundle store (``bundles.dir``): verified at start, typed errors for GetBundle (no daemons)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_node.bundles import BundleStore
from cloud_node.config import CloudConfig
from protos.errors import FailedPrecondition, NotFound
from tests.edge.test_bundle_format import FP, write_bundle

pytestmark = pytest.mark.unit


def test_a_bundle_of_the_served_model_is_handed_out_manifest_first(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m")
    store = BundleStore(tmp_path, {"m": FP, "other": "cd" * 32})
    chunks = list(store.chunks("m", 16))
    assert chunks[0].manifest == (tmp_path / "m" / "manifest.json").read_bytes()
    assert all(0 < len(c.data) <= 16 for c in chunks[1:])
    with pytest.raises(NotFound, match=r"no bundle of 'other' on this cloud"):
        store.chunks("other", 16)


def test_a_bundle_directory_that_names_no_served_model_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_bundle(tmp_path / "m")
    write_bundle(tmp_path / "resnet_18")  # a typo of the served model's name
    (tmp_path / "notes.txt").write_text("not a bundle")
    with caplog.at_level("WARNING", logger="cloud_node.bundles"):
        store = BundleStore(tmp_path, {"m": FP, "resnet18": "cd" * 32})
    assert store.unserved == ["resnet_18"]
    assert "bundles.dir: resnet_18 not handed out: no served model has that name (served: m, resnet18)" in caplog.text
    with pytest.raises(NotFound, match=r"no bundle of 'resnet_18'"):
        store.chunks("resnet_18", 16)


def test_a_bundle_whose_fingerprint_is_not_the_served_models_is_refused_at_start(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m")
    with pytest.raises(
        ValueError, match=r"bundles.dir: the bundle of 'm' is refused: .*model.fingerprint abababababab"
    ):
        BundleStore(tmp_path, {"m": "cd" * 32})
    (tmp_path / "m" / "cuts" / "2.onnx").write_bytes(b"h" * 49 + b"X")
    with pytest.raises(ValueError, match=r"the bundle of 'm' is refused: .*cuts/2.onnx: sha256"):
        BundleStore(tmp_path, {"m": FP})


def test_bundles_off_answer_failed_precondition_and_the_dir_is_relative_to_the_yaml(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="bundles are off on this cloud: set bundles.dir"):
        BundleStore(None, {"m": FP}).chunks("m", 16)
    (tmp_path / "cloud.yaml").write_text("models: []\njobs: {dir: jobs}\nbundles: {dir: bundles}\n")
    assert CloudConfig.from_yaml(str(tmp_path / "cloud.yaml")).bundles.dir == str(tmp_path / "bundles")
