"""The Ray backend's configuration and the parts that need no Ray: they run whether Ray is installed or not."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from cleave_cli.main import main as cleave
from cloud_node.config import CloudConfig, RaySettings
from cloud_node.main import build_config, build_daemon, close_services, parse_args
from cloud_node.ray_backend.serving import app_name, deployment_options, request_handle
from runtime.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}


def test_ray_is_off_by_default_and_the_flag_turns_it_on() -> None:
    assert not CloudConfig().ray.enabled
    for address in ("local", "auto", "ray://head:10001"):
        config = build_config(parse_args(["--model", "resnet18", "--ray-address", address]))
        assert config.ray.enabled and config.ray.address == address


@pytest.mark.parametrize(
    ("ray", "message"),
    [
        ({"address": "nowhere"}, "ray.address: must be '' (off), local, auto, or ray://HOST:PORT; got 'nowhere'"),
        ({"min_replicas": 3}, "ray.min_replicas: 3 is above max_replicas 1"),
        ({"max_replicas": 4, "replicas": 5}, "ray.replicas: 5 is not in [min_replicas, max_replicas]"),
        ({"target_ongoing_requests": 0}, "ray.target_ongoing_requests: must be > 0"),
        ({"num_gpus": -1}, "ray.num_gpus: must be >= 0"),
        ({"replica": 2}, "ray.replica: unknown key"),
        ({"env": {"A": 1}}, "ray.env"),
        ({"transport": "http"}, "ray.transport: must be one of grpc, actor, direct; got 'http'"),
        ({"jobs": {"job_num_cpus": 0}}, "ray.jobs.job_num_cpus: must be > 0"),
    ],
)
def test_a_bad_ray_section_fails_at_load_naming_the_key(ray: dict, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        CloudConfig.from_dict({"models": [TINY], "ray": ray})
    assert message in str(caught.value)


def test_deployment_options_follow_the_section() -> None:
    fixed = deployment_options(RaySettings(address="auto", replicas=2, min_replicas=2, max_replicas=2), "m")
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["name"] == "m" and fixed["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
    }
    assert fixed["logging_config"] == {"enable_access_log": False}
    scaled = deployment_options(
        RaySettings(
            address="auto",
            max_replicas=4,
            target_ongoing_requests=3,
            num_gpus=0.5,
            env={"X": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"},
            look_back_period_s=8,
            access_log=True,
        ),
        "m",
    )
    auto = scaled["autoscaling_config"]
    assert "num_replicas" not in scaled
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 4)
    assert auto["target_ongoing_requests"] == 3 and auto["metrics_interval_s"] == 4
    assert scaled["ray_actor_options"]["num_gpus"] == 0.5
    # ray.env adds variables and overrides Cleave's replica settings
    assert scaled["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"X": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    }
    assert scaled["logging_config"] == {"enable_access_log": True}
    # direct (the default): lane requests bypass the handles, so the policy that counts them in decides
    assert auto["policy"] == {"policy_function": "cloud_node.ray_backend.autoscale:ongoing_requests"}
    grpc = deployment_options(RaySettings(address="auto", max_replicas=4, transport="grpc"), "m")
    assert "policy" not in grpc["autoscaling_config"]  # Serve's own default policy
    batched = deployment_options(RaySettings(address="auto", max_replicas=4, max_batch_size=8), "m")
    assert "policy" not in batched["autoscaling_config"]  # @serve.batch needs Serve's path: no lane
    assert app_name(RaySettings(app_name="fleet"), "resnet18") == "fleet-resnet18"


def test_the_transport_picks_how_the_front_door_calls_the_deployment() -> None:
    class Handle:
        def options(self, **kwargs: object) -> dict:
            return kwargs

    handle = Handle()
    assert request_handle(handle, RaySettings(address="auto", transport="actor")) is handle  # Serve's default
    assert request_handle(handle, RaySettings(address="ray://head:10001")) is handle  # Ray Client: actor calls
    # grpc, and direct's fallback when no lane is known yet
    assert request_handle(handle, RaySettings(address="auto", transport="grpc")) == {
        "_by_reference": False,
        "request_serialization": "pickle",
        "response_serialization": "pickle",
    }


@pytest.mark.integration
def test_without_a_ray_section_the_cloud_never_imports_ray() -> None:
    code = (
        "import sys\n"
        "from cloud_node.config import CloudConfig\n"
        "from cloud_node.main import build_daemon, close_services\n"
        f"config = CloudConfig.from_dict({{'listen': '127.0.0.1:0', 'models': [{TINY!r}]}})\n"
        "daemon = build_daemon(config)\n"
        "close_services(daemon)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
def test_status_cloud_on_the_single_process_cloud_shows_one_pool_per_model() -> None:
    config = CloudConfig.from_dict({"listen": "127.0.0.1:0", "models": [TINY], "torch_threads": 1})
    daemon = build_daemon(config)
    port = daemon.start()
    try:
        out = io.StringIO()
        with redirect_stdout(out):
            assert cleave(["status", "--cloud", f"127.0.0.1:{port}", "--json"]) == 0
        table = io.StringIO()
        with redirect_stdout(table):
            assert cleave(["status", "--cloud", f"127.0.0.1:{port}"]) == 0
    finally:
        daemon.stop(grace=1)
        close_services(daemon)
    info = json.loads(out.getvalue())
    assert info["backend"] == "process"
    assert [(p["model"], p["running"], p["queue_depth"]) for p in info["pools"]] == [("tiny", 1, 0)]
    assert "tails: process" in table.getvalue() and "tiny" in table.getvalue()
