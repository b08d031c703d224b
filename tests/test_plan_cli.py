"""``cleave profile`` and ``cleave plan``, offline and against a real cloud daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleave_cli.launch import DaemonProcess
from cleave_cli.main import main

MODEL_ARGS = ["--model", "resnet18", "--input-shape", "1,3,64,64"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEAVE_CACHE", str(tmp_path / "cache"))


def test_profile_prints_every_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["profile", *MODEL_ARGS, "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    profile = json.loads((tmp_path / "p.json").read_text())
    assert len(profile["node_names"]) > 50
    assert all(name in out for name in profile["node_names"])


def test_offline_plan_writes_ranking_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "plan",
        *MODEL_ARGS,
        "--bandwidth",
        "5",
        "--rtt",
        "20",
        "--cloud-speedup",
        "8",
        "--json",
        str(tmp_path / "plan.json"),
        "--png",
        str(tmp_path / "plan.png"),
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "plan.json").read_text())
    best = report["best"]["cost_ms"]
    assert all(best <= r["cost_ms"] for r in report["ranked"])
    # Lossless baselines fit any accuracy budget, so the plan is never slower than them; lossy ones
    # (JPEG) are scored without budgets and may be faster but too inaccurate.
    assert all(best <= report["baselines"][b]["cost_ms"] + 1e-9 for b in ("edge-only", "neurosurgeon"))
    assert set(report["baselines"]) == {"neurosurgeon", "edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp"}
    assert report["baselines"]["cloud-webp"]["placement"] == "cloud-only webp"
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "baselines:" in out and "cloud-webp" in out
    assert main(["plan", *MODEL_ARGS]) == 1  # neither --cloud nor --bandwidth: a clear error
    assert "--bandwidth" in capsys.readouterr().err


def test_plan_against_a_cloud_daemon(cloud: DaemonProcess, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", *MODEL_ARGS, "--cloud", cloud.address, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"cloud {cloud.address}" in out and "Mbit/s" in out and "*" in out
