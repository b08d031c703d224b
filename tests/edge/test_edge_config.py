"""edge.yaml with a bundle: no model spec needed, bundle paths relative to the file, head bits the bundle has."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_node.config import EdgeConfig
from runtime.settings import SettingsError

pytestmark = pytest.mark.edge


def test_a_bundle_stands_for_the_model_and_resolves_next_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump({"bundle": "bundles/resnet18", "preload": True}))
    config = EdgeConfig.from_yaml(str(tmp_path / "edge.yaml"))
    assert config.model is None and config.preload
    assert config.bundle == str(tmp_path / "bundles" / "resnet18")


def test_neither_model_nor_bundle_is_refused() -> None:
    with pytest.raises(SettingsError, match="model: required .* unless bundle"):
        EdgeConfig.from_dict({"listen": "127.0.0.1:0"})


@pytest.mark.parametrize(
    ("head", "field"), [({"weight_bits": 4}, "head.weight_bits"), ({"allocate": True}, "head.allocate")]
)
def test_head_settings_a_bundle_cannot_serve_are_refused_at_load(head: dict, field: str) -> None:
    with pytest.raises((SettingsError, ValueError), match=field):
        EdgeConfig.from_dict({"bundle": "/b", "head": head})


def test_fetch_bundle_needs_the_directory_to_fill_and_the_same_model_name() -> None:
    model = {"name": "resnet18", "source": "resnet18"}
    with pytest.raises((SettingsError, ValueError), match="bundle: must be the directory fetch_bundle fills"):
        EdgeConfig.from_dict({"model": model, "fetch_bundle": {"model": "resnet18"}})
    with pytest.raises(SettingsError, match="fetch_bundle.model: 'resnet50' is not model.name 'resnet18'"):
        EdgeConfig.from_dict({"model": model, "bundle": "/b", "fetch_bundle": {"model": "resnet50"}})
    with pytest.raises((SettingsError, ValueError), match="max_files"):
        EdgeConfig.from_dict({"bundle": "/b", "fetch_bundle": {"model": "resnet18", "max_files": 0}})
    assert EdgeConfig.from_dict({"bundle": "/b", "fetch_bundle": {"model": "resnet18"}}).fetch_bundle.enabled


def test_a_calibration_directory_without_images_is_refused_at_load(tmp_path: Path) -> None:
    # Found only by the planner, the edge started, served edge-only and re-profiled the model at every
    # retry ("planner not ready (calibration: ... holds no image file)") without ever planning.
    (tmp_path / "camera").mkdir()
    (tmp_path / "camera" / "notes.txt").write_text("not an image")
    edge = {"model": {"name": "resnet18", "source": "resnet18"}, "autoplan": {"calibration": "camera"}}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge))
    with pytest.raises(SettingsError, match=r"autoplan.calibration: .*camera' holds no image file \(.jpg"):
        EdgeConfig.from_yaml(str(tmp_path / "edge.yaml"))
    (tmp_path / "camera" / "frame.JPG").write_bytes(b"")  # by suffix, as the planner reads them
    assert EdgeConfig.from_yaml(str(tmp_path / "edge.yaml")).autoplan.calibration == str(tmp_path / "camera")
