"""The torch-free edge re-plans when its link is shaped (tc on a veth between network namespaces,
as tests/test_replan_link.py does for the torch edge), and no request fails meanwhile. Needs root."""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from benchmarks.netlab import NetLab
from cleave_cli.launch import free_port
from tests.support.nsprobe import HEALTH, poll

from .conftest import LIGHT_EDGE, ROOT, build_bundle, child_env, cloud_python

AVAILABLE, WHY = NetLab.available()
pytestmark = [
    pytest.mark.edge,
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(not AVAILABLE, reason=f"needs network namespaces and tc: {WHY}"),
]

# Big enough that a device with a tenth of a core is clearly slower than sending the work away (at 64x64
# the whole model runs inside one cgroup period's quota, and edge-only wins even on a fast link).
MODEL = {"name": "resnet18", "source": "resnet18", "input_shape": [1, 3, 128, 128]}

STATUS = (
    "import grpc,json,sys;from protos.cleave.v1 import edge_pb2 as e, edge_pb2_grpc as g;"
    "s=g.EdgeStub(grpc.insecure_channel(sys.argv[1])).GetStatus(e.GetStatusRequest(),timeout=5);"
    "print(json.dumps({'reason':s.plan.reason,'placement':e.Placement.Name(s.plan.placement),"
    "'cut':s.plan.cut_index,'upload_ms':s.plan.predicted.upload_ms,'backend':s.backend,'error':s.planner_error}))"
)


def test_the_light_edge_replans_on_a_shaped_link(edge_cache: Path, tmp_path: Path) -> None:
    edge_bundle = build_bundle(tmp_path / "bundle", edge_cache, MODEL["input_shape"])
    cloud_port, edge_port = free_port(), free_port()
    edge_address = f"127.0.0.1:{edge_port}"
    env = child_env(edge_cache)
    (tmp_path / "cloud.yaml").write_text(yaml.safe_dump({"models": [MODEL], "listen": f"127.0.0.1:{cloud_port}"}))
    with ExitStack() as stack:
        lab = stack.enter_context(NetLab("cleave-ledge"))
        cloud_log = stack.enter_context(open(tmp_path / "cloud.log", "wb"))
        edge_log = stack.enter_context(open(tmp_path / "edge.log", "wb"))
        lab.shape(up_mbit=100, down_mbit=100)
        argv = [cloud_python(), "-m", "cloud_node.main", "--config", str(tmp_path / "cloud.yaml")]
        lab.popen(lab.cloud_ns, argv, stdout=cloud_log, stderr=cloud_log, cwd=ROOT, env=env)
        poll(lab, lab.cloud_ns, HEALTH, f"127.0.0.1:{cloud_port}", lambda _: True, 180)
        relay = lab.relay(lab.cloud_ns, listen=f"{lab.cloud_ip}:0", target=f"127.0.0.1:{cloud_port}", delay_ms=2)
        config = {
            "bundle": str(edge_bundle),
            "listen": edge_address,
            "cloud": relay.address,
            "torch_threads": 1,
            "autoplan": {"check_interval_s": 0.5, "probe_interval_s": 1.0, "confirmations": 2},
        }
        (tmp_path / "edge.yaml").write_text(yaml.safe_dump(config))
        argv = [*LIGHT_EDGE, "--config", str(tmp_path / "edge.yaml")]
        # A tenth of a core: a device much slower than the cloud, which a fast link makes worth using.
        lab.popen(lab.edge_ns, argv, cpu_quota=0.1, stdout=edge_log, stderr=edge_log, cwd=ROOT, env=env)
        poll(lab, lab.edge_ns, HEALTH, edge_address, lambda _: True, 120)
        first = json.loads(poll(lab, lab.edge_ns, STATUS, edge_address, lambda o: "planned at" in o, 240))
        assert first["backend"].startswith("onnx bundle"), first
        plans = [line for line in (tmp_path / "edge.log").read_text().splitlines() if "plan" in line]
        assert first["placement"] != "EDGE_ONLY", (first, plans)  # fast link, slow device: use the cloud

        stop = tmp_path / "stop"
        argv = [sys.executable, "-m", "tests.support.drive", "--edge", edge_address, "--seconds", "150"]
        argv += ["--shape", ",".join(map(str, MODEL["input_shape"])), "--stop-file", str(stop)]
        driver = lab.popen(lab.edge_ns, argv, stdout=-1, cwd=ROOT, text=True, env=env)
        time.sleep(6)
        lab.shape(up_mbit=0.1, down_mbit=0.1)
        shaped_at = time.monotonic()
        moved = json.loads(poll(lab, lab.edge_ns, STATUS, edge_address, lambda o: "re-planned at" in o, 120))
        time.sleep(4)
        stop.touch()
        out, _ = driver.communicate(timeout=120)
    report = json.loads(out)
    assert report["errors"] == [], report["errors"]
    assert any(r["t"] > shaped_at for r in report["replies"])  # answered while the plan changed
    # At a thousandth of the bandwidth the new plan sends less than the first would (or nothing at all):
    # its predicted upload at 0.1 Mbit/s is under 1000x the first plan's at 100 Mbit/s.
    assert (moved["placement"], moved["cut"]) != (first["placement"], first["cut"]), (first, moved)
    assert moved["placement"] == "EDGE_ONLY" or moved["upload_ms"] < 1000 * first["upload_ms"], (first, moved)
