"""YAML configs become dataclasses, and every mistake names its key."""

from pathlib import Path

import pytest

from cloud_node.config import CloudConfig
from edge_node.config import EdgeConfig
from edge_node.main import build_config, parse_args
from runtime.settings import SettingsError


def test_cloud_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        "listen: 127.0.0.1:6000\n"
        "models:\n  - {name: r18, source: resnet18, input_shape: [1, 3, 64, 64]}\n"
        "limits: {max_sessions: 3}\n"
    )
    config = CloudConfig.from_yaml(str(path))
    assert config.listen == "127.0.0.1:6000"
    assert config.models[0].name == "r18" and tuple(config.models[0].input_shape) == (1, 3, 64, 64)
    assert config.limits.max_sessions == 3


@pytest.mark.parametrize(
    "data, message",
    [
        ({"limits": {"max_sesions": 3}}, "limits.max_sesions: unknown key"),
        ({"limits": {"max_sessions": "many"}}, "limits.max_sessions: expected int"),
        ({"models": {"name": "x"}}, "models: expected a list"),
        ({"models": [{"name": "a", "source": "resnet18"}, {"name": "a", "source": "resnet18"}]}, "duplicate"),
        ({"models": [{"name": "a", "source": "resnet18", "colour": 1}]}, "colour"),
    ],
)
def test_cloud_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        CloudConfig.from_dict(data)


def test_edge_config_requires_a_model() -> None:
    with pytest.raises(SettingsError, match="model: required"):
        EdgeConfig.from_dict({"cloud": "127.0.0.1:1"})


def test_edge_quick_start_flags() -> None:
    args = parse_args(
        [
            "--port",
            "7000",
            "--cloud",
            "localhost:7001",
            "--model",
            "resnet18",
            "--cut",
            "layer1_1_relu_1",
            "--bits",
            "4",
            "--input-shape",
            "1,3,64,64",
        ]
    )
    config = build_config(args)
    assert config.listen == "127.0.0.1:7000" and config.cloud == "localhost:7001"
    assert config.model.source == "resnet18" and tuple(config.model.input_shape) == (1, 3, 64, 64)
    assert config.plan.cut == "layer1_1_relu_1" and config.plan.encoding == "int4"


def test_edge_rejects_bad_encoding_at_start() -> None:
    with pytest.raises(ValueError):
        build_config(parse_args(["--model", "resnet18", "--encoding", "int7"]))


def test_example_configs_parse() -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    cloud = CloudConfig.from_yaml(str(examples / "cloud.yaml"))
    edge = EdgeConfig.from_yaml(str(examples / "edge.yaml"))
    assert cloud.models[0] == edge.model  # the fingerprint check needs the same spec on both sides
