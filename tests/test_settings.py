"""YAML configs become dataclasses, and every mistake names its key."""

import re
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


# -- one way to validate: Settings.validate, at construction, hence at load, named by YAML path ------

EDGE_MODEL = {"name": "r18", "source": "resnet18"}


def test_a_bad_objective_fails_at_load_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("model: {name: r18, source: resnet18}\nautoplan: {objective: fastest}\n")
    with pytest.raises(SettingsError) as caught:
        EdgeConfig.from_yaml(str(path))
    assert str(caught.value) == "autoplan.objective: must be one of latency, throughput; got 'fastest'"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"autoplan": {"baseline": "oracle"}}, "autoplan.baseline: must be one of neurosurgeon, edge-only"),
        ({"autoplan": {"min_top1": 1.5}}, r"autoplan.min_top1: must be in \[0, 1\] or unset; got 1.5"),
        ({"autoplan": {"confirmations": 0}}, "autoplan.confirmations: must be > 0; got 0"),
        ({"head": {"weight_bits": 7}}, "head.weight_bits: must be one of 32, 8, 6, 5, 4, 3, 2; got 7"),
        ({"plan": {"encoding": "int7"}}, "plan.encoding: "),
        ({"reconnect": {"initial_s": 2.0, "max_s": 1.0}}, r"reconnect.max_s: must be >= initial_s \(2.0\); got 1.0"),
        ({"limits": {"stream_window": 0}}, "limits.stream_window: must be > 0; got 0"),
        ({"limits": {"max_streams": 40}}, "limits.max_streams: 40 must be in"),  # needs max_workers: the parent checks
        ({"keepalive": {"interval_ms": 1}}, "keepalive.interval_ms: 1 is under 2"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen: 'nowhere' is not host:port or a port"),
        ({"cloud_tls": {"cert": "c.pem"}}, "cloud_tls: cert and key go together"),
        ({"log_level": "loud"}, "log_level: must be one of DEBUG, INFO"),
        ({"request_timeout_s": 0}, "request_timeout_s: must be > 0; got 0"),
    ],
)
def test_edge_settings_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        EdgeConfig.from_dict({"model": EDGE_MODEL, **data})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"jobs": {"sandbox": {"timeout_s": 0}}}, "jobs.sandbox.timeout_s: must be > 0; got 0"),
        ({"jobs": {"retention": {"interval_s": -1.0}}}, "jobs.retention.interval_s: must be > 0; got -1.0"),
        ({"jobs": {"queue_limit": 0}}, "jobs.queue_limit: must be > 0; got 0"),
        ({"batching": {"models": [{"model": "m", "max_batch_size": 0}]}}, r"batching.models\[0\].max_batch_size: 0"),
        ({"limits": {"max_sessions_per_client": 0}}, "limits.max_sessions_per_client: must be > 0; got 0"),
        ({"max_workers": 0}, "max_workers: must be > 0; got 0"),
        ({"log_level": "LOUD"}, "log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got 'LOUD'"),
    ],
)
def test_cloud_settings_errors_name_the_key(data: dict, message: str) -> None:
    data = {"models": [{"name": "m", "source": "resnet18"}], **data}
    with pytest.raises(SettingsError, match=message):
        CloudConfig.from_dict(data)


def test_settings_built_in_code_are_checked_too() -> None:
    from edge_node.config import AutoPlanSettings

    with pytest.raises(ValueError, match="objective: must be one of latency, throughput; got 'fastest'"):
        AutoPlanSettings(objective="fastest")


def test_revalidate_names_a_nested_key_changed_after_load() -> None:
    from runtime.settings import revalidate

    config = EdgeConfig.from_dict({"model": EDGE_MODEL})
    revalidate(config)
    config.autoplan.objective = "fastest"  # what a command-line flag could do
    with pytest.raises(SettingsError, match="^autoplan.objective: must be one of"):
        revalidate(config)
    cloud = CloudConfig.from_dict({"models": [{"name": "m", "source": "resnet18"}]})
    cloud.batching.max_queue_delay_ms = -1
    with pytest.raises(SettingsError, match="^batching.max_queue_delay_ms: -1 must be >= 0"):
        revalidate(cloud)


def test_edge_flags_are_validated_like_the_file() -> None:
    with pytest.raises(SettingsError, match="^plan.encoding: "):
        build_config(parse_args(["--model", "resnet18", "--encoding", "int7"]))


def test_the_config_choices_are_the_planners() -> None:
    """edge_node.config repeats the planner's choices so that loading a config needs no torch."""
    from edge_node import config
    from partitioner import planner

    assert config.OBJECTIVES == planner.OBJECTIVES
    assert config.BASELINES == planner.BASELINES


def test_every_settings_dataclass_validates_the_same_way() -> None:
    """Each dataclass a daemon's YAML reaches is a Settings (no __post_init__, check() or bare class)."""
    import dataclasses
    import typing

    from runtime.settings import Settings

    seen: set[type] = set()

    def walk(cls: type) -> None:
        if cls in seen or not dataclasses.is_dataclass(cls) or cls.__module__.startswith("partitioner."):
            return  # ModelSpec (partitioner, below runtime) validates in its own __post_init__
        seen.add(cls)
        assert issubclass(cls, Settings), f"{cls.__module__}.{cls.__name__} is not a runtime.settings.Settings"
        for hint in typing.get_type_hints(cls).values():
            for arg in (hint, *typing.get_args(hint)):
                if isinstance(arg, type):
                    walk(arg)

    walk(EdgeConfig)
    walk(CloudConfig)
    assert len(seen) >= 15


# -- what a careless user types: each fails at start, naming the key or flag ----------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1", "localhost:-1", "nonsense", ":50051"])
def test_a_listen_address_gRPC_would_bind_wrongly_is_refused(listen: str) -> None:
    # gRPC binds 127.0.0.1:99999 on port 34463, a missing port on 443 and -1 on 65535, without a word.
    message = f"^listen: '{re.escape(listen)}' is not host:port with a port in 0..65535"
    with pytest.raises(SettingsError, match=message):
        CloudConfig.from_dict({"listen": listen, "models": [EDGE_MODEL]})
    with pytest.raises(SettingsError, match=message):
        EdgeConfig.from_dict({"listen": listen, "model": EDGE_MODEL})
    with pytest.raises(SettingsError, match="^listen: '127.0.0.1:99999' is not host:port"):
        build_config(parse_args(["--model", "resnet18", "--port", "99999"]))
    for good in ("127.0.0.1:0", "[::1]:50051", "localhost:65535"):
        assert CloudConfig.from_dict({"listen": good, "models": [EDGE_MODEL]}).listen == good


@pytest.mark.parametrize("cloud", ["cloud.example", "10.0.0.2:99999", "10.0.0.2:port"])
def test_a_cloud_address_without_a_usable_port_is_refused(cloud: str) -> None:
    # gRPC dials a target without a port on 443: the edge served edge-only, its status saying only "unavailable".
    message = f"^cloud: '{re.escape(cloud)}' is not host:port"
    with pytest.raises(SettingsError, match=message):
        EdgeConfig.from_dict({"cloud": cloud, "model": EDGE_MODEL})
    with pytest.raises(SettingsError, match=message):
        build_config(parse_args(["--model", "resnet18", "--cloud", cloud]))
    assert EdgeConfig.from_dict({"cloud": "[::1]:50051", "model": EDGE_MODEL}).cloud == "[::1]:50051"


def test_a_config_that_is_not_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("listen: 127.0.0.1:6000\nmodels: [{name: r, source: resnet18\n")
    with pytest.raises(SettingsError, match=r"^config .*cloud.yaml: not valid YAML at line 3, column 1: expected"):
        CloudConfig.from_yaml(str(path))
    with pytest.raises(SettingsError, match="not valid YAML"):
        EdgeConfig.from_yaml(str(path))


@pytest.mark.parametrize("shape", ["1,3,x", "1,3,-5,64", "1,,3"])
def test_a_bad_input_shape_flag_is_named(shape: str) -> None:
    from cloud_node.main import build_config as cloud_config
    from cloud_node.main import parse_args as cloud_args

    message = f"^--input-shape: '{re.escape(shape)}' is not a shape: integers > 0"
    with pytest.raises(ValueError, match=message):
        build_config(parse_args(["--model", "resnet18", "--input-shape", shape]))
    with pytest.raises(ValueError, match=message):
        cloud_config(cloud_args(["--model", "resnet18", "--input-shape", shape]))


def test_a_model_spec_without_torch_says_to_run_a_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch-free edge (`pip install cleave`) given --model failed after listening, with a traceback
    # ending in "No module named 'torch'".
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SettingsError, match=r"^model: 'resnet18' runs on the torch edge, and torch is not installed"):
        build_config(parse_args(["--model", "resnet18"]))
    assert build_config(parse_args(["--bundle", "/nowhere/lite0"])).bundle == "/nowhere/lite0"  # checked at load


def test_cloud_max_batch_size_flag_is_checked_not_silently_off(capsys: pytest.CaptureFixture) -> None:
    from cloud_node.main import build_config as cloud_config
    from cloud_node.main import parse_args as cloud_args

    with pytest.raises(SystemExit) as exit_:
        cloud_args(["--model", "resnet18", "--max-batch-size", "0"])
    assert exit_.value.code == 2
    assert "--max-batch-size: 0 is not an integer >= 1 (1: batching off)" in capsys.readouterr().err
    off = cloud_config(cloud_args(["--model", "resnet18", "--max-batch-size", "1"])).batching
    assert not off.active and off.max_batch_size == 1
    on = cloud_config(cloud_args(["--model", "resnet18", "--max-batch-size", "4"])).batching
    assert on.active and on.max_batch_size == 4
