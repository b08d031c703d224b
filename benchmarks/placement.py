"""Placement benchmark: does the edge daemon's own plan match the best placement measured on a real shaped link?

By default it runs on real ground: the ImageNet-pretrained EfficientNet-Lite0 (``efficientnet_lite0_pretrained``),
real photos (``partitioner.photos``: the edge calibrates on them and the requests are other crops), an edge made
4x, 10x and 30x slower than the cloud (``--speeds``), links of 1, 5, 20 and 100 Mbit/s. For each (edge speed,
bandwidth) cell it measures, end to end, the candidates the planner considers pinned side by side (the *oracle*),
then lets the edge daemon plan by itself (``cut: auto``: its own profile, the cloud's profile over
``SplitInference.Profile``, an active link probe) and measures the plan it chose. Reported per cell:

- **Cleave's plan**, its predicted and measured latency;
- **the oracle within the accuracy budget** (top-1 agreement >= 99% on the calibration photos, the edge's default)
  and **ratio** = Cleave's plan / that oracle, both pinned and re-measured side by side in a confirmation round,
  then the two alone, back to back, in a final round (the median of its paired ratios);
- **speed-up** of Cleave over the better of edge-only and cloud-only within the budget (lossless int8c, or a
  JPEG/WebP whose top-1 agreement is within the budget): what a user would do without splitting;
- the latency of each strategy: **edge-only**, **cloud-only raw** ("int8c": the input as 8-bit codes + zstd),
  **cloud-only JPEG** and **WebP** (quality 90), **Neurosurgeon-style** (the best cut with uncompressed fp32
  features "raw+none", or edge-only), **Cleave** and the oracle.

Edge speed (``--speeds``, slowdown factors): the cloud daemon runs one torch thread, unrestricted, and profiles
itself first, alone (its whole-model latency is the reference). Then one process in the edge namespace times the
whole model under CPU quotas, correcting the quota by the measured factor until the edge's whole-model latency is
that many times the cloud's (within ``--speed-tolerance``); the achieved factor is recorded (``speed_achieved``),
and the driver also records the ratio of the two daemons' own profiles (``edge_slowdown``). ``--speeds none``
uses one fixed ``--edge-cpu`` quota.

Set-up (needs root; ``benchmarks/netlab.py``): two network namespaces joined by a veth pair, shaped with tbf at
each bandwidth in both directions. The cloud daemon runs in the cloud namespace on 127.0.0.1; a ``DelayRelay`` in
front of it (on the cloud's veth address) adds ``--delay-ms`` each way. The edge daemon runs in the edge namespace
on 127.0.0.1 under a CFS CPU quota (``--edge-threads`` torch threads), one daemon per edge speed. The request driver
is this file re-invoked as ``placement.py drive ...`` inside the edge namespace (an app on the device); it asks the
parent to re-shape the link through a line protocol on its stdin/stdout and writes its results as JSON to a file.

What the oracle measures (``--cuts``): ``all`` = every cut at its best encoding (best in the planner's own ranking
for that cut at the probed link, within the accuracy budget); ``N`` = N evenly spaced cuts, each at its best
encoding within the budget, plus the planner's ``--top`` best placements within the budget, each at **every**
encoding within the budget predicted at most 2x the best plan, plus every baseline's cut (each at its best
encoding within the budget; the Neurosurgeon cut also with raw+none), plus the edge's own choice. Always:
edge-only and **every cloud-only candidate** (int8c, JPEG q75/90/95, WebP q75/90/95; each marked within the
budget or not). The mode that
ran is printed and recorded. The benchmark's planner is built in the driver as the edge daemon builds its own (the
edge's cached profile, the cloud's profile, the same calibration photos and budgets), and the driver records
whether both choose the same plan.

Latency is the median of ``--repeats`` requests after ``--warmup`` (client-side, app to edge daemon and back).
Prediction errors compare the planner's prediction with the edge daemon's own request time (``timing.total_ms``),
which is what the latency model describes (it leaves out the app's local call into the daemon). The Cleave row is
measured under automatic planning; ``auto/pin`` compares it with the same plan pinned.

    sudo .venv/bin/python -m benchmarks.placement                                  # the 3 x 4 real grid
    sudo .venv/bin/python -m benchmarks.placement --speeds 10 --bandwidths 20        # one cell
    sudo .venv/bin/python -m benchmarks.placement --speeds 30 --append ...           # add a speed to the results
    sudo .venv/bin/python -m benchmarks.placement --speeds none --edge-cpu 0.5 --models resnet50,mobilenet_v2 \
        --out benchmarks/results/placement                                         # the older synthetic runs
    .venv/bin/python -m benchmarks.placement report                                # table and plots from the JSON

Results: ``benchmarks/results/placement_real.json`` (``--out``), ``placement_real.png`` (latency against bandwidth
per edge speed and strategy), ``placement_real_prediction.png`` (predicted against measured latency) and
``placement_real_cuts.png`` (measured and predicted latency per cut). ``benchmarks/results/placement.json`` holds
the earlier random-weight runs (``report --out benchmarks/results/placement`` still reads it). Durations: see
docs/placement-benchmark.md. Every request, plan, daemon start, calibration and driver is bounded in time
(``--*-timeout-s``). Without root (``NetLab.available()`` false) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.netlab import NetLab  # standard library only: the no-root check stays fast

ROOT = Path(__file__).resolve().parent.parent
#: This file again, for its sub-commands in child processes (run with ``cwd=ROOT``).
SELF = [sys.executable, "-m", "benchmarks.placement"]

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("efficientnet_lite0_pretrained",)  # real weights and real photos; torchvision names work too
BANDWIDTHS = (1.0, 5.0, 20.0, 100.0)
SPEEDS = (4.0, 10.0, 30.0)  # the edge's whole-model latency over the cloud's (one core each)
MIN_QUOTA_US = 1000  # the kernel refuses a CFS quota under 1 ms
CLOUD_PORT, EDGE_PORT = 50051, 50052  # fresh namespaces: every port is free
STRATEGIES = ("edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp", "neurosurgeon", "cleave", "oracle")
MSG = "@@ "
DRIVER_OPTIONS = (
    "cuts",
    "top",
    "repeats",
    "passes",
    "warmup",
    "settle_s",
    "confirm",
    "final_passes",
    "final_repeats",
    "speedup_passes",
    "speedup_repeats",
    "edge_threads",
    "candidate_budget_s",
    "request_timeout_s",
    "ready_timeout_s",
    "delay_ms",
)  # passed on to the driver as they are  # prefix of protocol lines from the driver on its stdout


# ================================================================================================================
# The parent: prepare weights, build the lab, run one driver per model, write JSON, plots and a table
# ================================================================================================================
def prepare_model(workdir: Path, model: str, size: int) -> dict[str, Any]:
    """Seeded weights with BatchNorm calibrated on synthetic images, saved for both daemons (as the demo does).

    A pretrained model (``efficientnet_lite0_pretrained``) is used as it ships: its weights, and real photos for
    calibration (the edge's default for pretrained models) and for the requests.
    """
    import torch

    from partitioner.models import PRETRAINED, ModelSpec, calibrate_batchnorm, load_model

    shape = (1, 3, size, size)
    if model in PRETRAINED:
        return {"name": model, "source": model, "input_shape": list(shape)}
    weights = workdir / f"{model}.pt"
    if not weights.exists():
        module = calibrate_batchnorm(load_model(ModelSpec(name=model, source=model, input_shape=shape)), shape)
        torch.save(module.state_dict(), weights)
    return {"name": model, "source": model, "weights": str(weights), "input_shape": list(shape)}


def bottleneck_entry(entry: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The model ``entry`` with the learned bottleneck in ``directory`` inserted (both daemons serve it so)."""
    return {**entry, "name": f"{entry['name']}_bneck", "bottleneck": str(Path(directory).resolve())}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def daemon_env(cache: Path) -> dict[str, str]:
    """Each daemon gets its own profile cache: a shared one would hand the throttled edge an unthrottled profile."""
    return {**os.environ, "CLEAVE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


class Driver:
    """The ``drive`` subprocess in the edge namespace, and the parent's side of its line protocol."""

    def __init__(
        self,
        lab: NetLab,
        argv: list[str],
        env: dict[str, str],
        deadline_s: float,
        edge_cgroup: Path | None = None,
        cores: str = "",
    ) -> None:
        self.lab = lab
        self.proc = lab.popen(
            lab.edge_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        set_affinity(self.proc.pid, cores)
        self.deadline = time.monotonic() + deadline_s
        self.edge_cgroup = edge_cgroup
        self.cpu_stats: list[dict[str, int]] = []  # the edge's cgroup at each re-shape (a cell's start) and at the end
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def serve(self) -> int:
        """Answer the driver's requests until it exits (or the deadline passes: then kill it). Its exit code."""
        while True:
            try:
                line = self.lines.get(timeout=max(self.deadline - time.monotonic(), 0.0))
            except queue.Empty:
                print("[placement] driver ran past its deadline; stopping it", flush=True)
                self.proc.kill()
                return self.proc.wait()
            if line is None:
                return self.proc.wait()
            if not line.startswith(MSG):
                print(line, end="", flush=True)
                continue
            self._answer(json.loads(line[len(MSG) :]))

    def snapshot_cpu(self) -> None:
        if self.edge_cgroup is not None:
            self.cpu_stats.append(cgroup_cpu(self.edge_cgroup))

    def _answer(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        if "shape" in message:
            self.lab.shape(float(message["shape"]))
            self.snapshot_cpu()
            reply = "ok"
        else:
            reply = f"error: unknown request {message}"
        self.proc.stdin.write(reply + "\n")
        self.proc.stdin.flush()


def set_affinity(pid: int, cores: str) -> None:
    """Run every thread of ``pid`` (and what it starts later) on ``cores`` ("1", "0,1"; "": leave it)."""
    if cores:
        subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True)


def cgroup_cpu(cg: Path) -> dict[str, int]:
    """The quota, period and counters of a v1 cpu cgroup (``cpu.stat``; ``cpuacct.usage`` where co-mounted)."""
    out = {
        "quota_us": int((cg / "cpu.cfs_quota_us").read_text()),
        "period_us": int((cg / "cpu.cfs_period_us").read_text()),
    }
    for line in (cg / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        out[key] = int(value)
    usage = cg / "cpuacct.usage"
    if usage.exists():
        out["usage_ns"] = int(usage.read_text())
    return out


def cpu_check(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, Any]:
    """What the edge's CPU quota did over one cell: the quota in force, how often it throttled, the CPU used."""
    periods = after.get("nr_periods", 0) - before.get("nr_periods", 0)
    throttled = after.get("nr_throttled", 0) - before.get("nr_throttled", 0)
    out: dict[str, Any] = {
        "quota_cores": after["quota_us"] / after["period_us"] if after["quota_us"] > 0 else None,
        "period_ms": after["period_us"] / 1e3,
        "periods": periods,
        "throttled_share": throttled / periods if periods else 0.0,
        "throttled_s": (after.get("throttled_time", 0) - before.get("throttled_time", 0)) / 1e9,
    }
    if "usage_ns" in after and seconds > 0:
        out["cpu_cores_used"] = (after["usage_ns"] - before["usage_ns"]) / 1e9 / seconds
    return out


def set_cfs_period(lab: NetLab, pid: int, cores: float, period_ms: float) -> float:
    """Set the CPU quota of the cgroup NetLab put ``pid`` in to ``cores``, with a short CFS period. Returns the
    period used, ms.

    With NetLab's 100 ms period a 0.5-core quota lets a 40 ms burst run at full speed and then stalls for 50 ms: a
    single request would see a fast device, back-to-back profiling a slow one. A short period spreads the quota
    evenly, which is what a slower CPU looks like. The period grows where the quota would fall under the kernel's
    1 ms minimum (below 0.1 core at 10 ms).
    """
    cg = lab_cgroup(lab, pid)
    period = max(int(period_ms * 1000), -(-MIN_QUOTA_US * 1000 // max(int(cores * 1000), 1)))
    # Lower the quota before a longer period and raise it after a shorter one: never an invalid pair.
    (cg / "cpu.cfs_quota_us").write_text("-1")
    (cg / "cpu.cfs_period_us").write_text(str(period))
    (cg / "cpu.cfs_quota_us").write_text(str(max(int(cores * period), MIN_QUOTA_US)))
    return period / 1000


def lab_cgroup(lab: NetLab, pid: int, timeout: float = 10.0) -> Path:
    """The lab's cpu cgroup of ``pid``, once the process has joined it (it does so right after starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(",") and Path(path).name.startswith(lab.prefix):
                return Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} did not join a cpu cgroup of the lab")


class LineChild:
    """A child process that answers ``MSG``-prefixed JSON lines on its stdout; other lines are echoed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, request: str | None, timeout_s: float) -> dict[str, Any]:
        """Send ``request`` (a line; None: just wait) and return the next message, within ``timeout_s``."""
        if request is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise TimeoutError(f"no answer to {request!r} in {timeout_s:.0f} s") from None
            if line is None:
                raise RuntimeError(f"the child exited ({self.proc.wait()}) before answering {request!r}")
            if line.startswith(MSG):
                return json.loads(line[len(MSG) :])
            print(line, end="", flush=True)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def calibrate_speeds(lab: NetLab, args: argparse.Namespace, entry: dict[str, Any], cloud_ms: float) -> dict[str, Any]:
    """The CPU quota that makes the edge ``speed`` times slower than the cloud, for each speed.

    ``cloud_ms``: the cloud daemon's own profiled whole-model latency (one torch thread, unrestricted). One process
    in the edge namespace loads the model (``--edge-threads`` torch threads, as the edge daemon runs it) and times
    the whole model on a request input, first without a quota (recorded), then under quotas: starting from
    ``full-core time / cloud_ms / speed`` core, the quota is corrected by the measured factor until the achieved
    slowdown is within ``--speed-tolerance`` (at most ``--speed-tries`` times). What was achieved is recorded.
    """
    argv = [*SELF, "calibrate", "--entry", json.dumps(entry)]
    argv += ["--edge-threads", str(args.edge_threads)]
    proc = lab.popen(
        lab.edge_ns, argv, cpu_quota=1.0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    set_affinity(proc.pid, args.edge_cores)  # where the edge daemon will run
    child = LineChild(proc)
    try:
        (lab_cgroup(lab, proc.pid) / "cpu.cfs_quota_us").write_text("-1")  # no quota yet
        child.ask(None, args.ready_timeout_s)  # loaded and warm
        full_ms = child.ask("10", args.ready_timeout_s)["ms"]
        base_ms = cloud_ms
        print(
            f"[placement] {entry['name']}: whole model {base_ms:.1f} ms in the cloud (its profile), {full_ms:.1f} ms "
            "in the edge's namespace without a quota",
            flush=True,
        )
        speeds = {}
        for speed in args.speeds:
            quota, tries = min(1.0, full_ms / base_ms / speed), []
            for _ in range(args.speed_tries):
                period = set_cfs_period(lab, proc.pid, quota, args.cfs_period_ms)
                runs = max(3, min(10, round(3000 / (base_ms * speed))))  # about 3 s of work, 3 to 10 runs
                ms = child.ask(str(runs), args.ready_timeout_s + 60 * speed)["ms"]
                tries.append({"quota": quota, "cfs_period_ms": period, "ms": ms, "factor": ms / base_ms})
                print(f"[placement]   {speed:g}x: {quota:.4f} core -> {ms:.1f} ms ({ms / base_ms:.2f}x)", flush=True)
                if abs(ms / base_ms / speed - 1) <= args.speed_tolerance:
                    break
                quota = min(1.0, max(0.01, quota * (ms / base_ms) / speed))
            best = min(tries, key=lambda t: abs(t["factor"] / speed - 1))
            speeds[f"{speed:g}"] = {"target": speed, **best, "tries": tries}
        return {"base_ms": base_ms, "edge_full_core_ms": full_ms, "threads": args.edge_threads, "speeds": speeds}
    finally:
        child.stop()


def calibrate_child(args: argparse.Namespace) -> int:
    """The ``calibrate`` subcommand: load the model, then answer each line N with the median of N whole-model runs."""
    import torch

    from cleave_cli.images import synthetic_images
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from partitioner.photos import builtin_photos

    torch.set_num_threads(args.edge_threads)
    spec = ModelSpec.from_dict(json.loads(args.entry))
    module = LoadedModel.load(spec).module
    shape = spec.input_shape
    x = builtin_photos(shape, 9)[8:] if spec.pretrained else synthetic_images(1, shape, seed=7)
    with torch.inference_mode():
        module(x)
        print(MSG + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            times = []
            for _ in range(int(line)):
                t0 = time.perf_counter()
                module(x)
                times.append((time.perf_counter() - t0) * 1e3)
            print(MSG + json.dumps({"ms": statistics.median(times)}), flush=True)
    return 0


def prewarm(args: argparse.Namespace, workdir: Path, entry: dict[str, Any]) -> Path:
    """Fill a disk cache with what the edge daemon's planner computes from the model and its calibration photos
    alone: the encoded bytes at every cut, and the distortion (top-1 agreement) of the candidates it and the
    driver are likely to check at each edge speed and bandwidth. Run once per model, unthrottled; every edge daemon
    and driver shares it (as a device that planned before would have it), so a 30x-slower edge does not spend many
    minutes re-encoding every cut before its first plan. Its profile, the link probe and any distortion not in the
    cache are still its own.
    Returns the cache directory (``sizes/`` and ``distortion/`` under it)."""
    cache = workdir / "cache" / f"prewarm-{entry['name']}"
    argv = [*SELF, "prewarm", "--entry", json.dumps(entry)]
    argv += ["--speeds", ",".join(f"{v:g}" for v in args.speeds) or "1", "--delay-ms", str(args.delay_ms)]
    argv += ["--bandwidths", ",".join(f"{b:g}" for b in args.bandwidths), "--cuts", args.cuts, "--top", str(args.top)]
    started = time.monotonic()
    subprocess.run(argv, env=daemon_env(cache), cwd=ROOT, check=True, timeout=args.ready_timeout_s)
    print(f"[placement] {entry['name']}: planner caches pre-filled in {time.monotonic() - started:.0f} s", flush=True)
    return cache


def prewarm_child(args: argparse.Namespace) -> int:
    """The ``prewarm`` subcommand: the edge's cost model with its cache, and its distortion checks at each speed
    (this host's profile scaled by the speed stands in for the edge's) and nominal bandwidth."""
    from dataclasses import replace

    from edge_node.config import AutoPlanSettings
    from partitioner.costmodel import CostModel, Link
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from partitioner.photos import calibration_inputs
    from partitioner.planner import Budgets, Planner, cached_distortion, distortion_meter
    from partitioner.profile import profile_model

    spec = ModelSpec.from_dict(json.loads(args.entry))
    model = LoadedModel.load(spec)
    s = AutoPlanSettings()
    calib = calibration_inputs(model.spec, s.calibration, s.calibration_inputs)  # as the edge calibrates
    here = profile_model(model, repeats=3, warmup=1, head_samples=4)
    cost = CostModel.measure(model, here, here, calib[: s.byte_samples], cache=True, workers=os.cpu_count() or 1)
    meter = cached_distortion(distortion_meter(model, calib, record=True), model, calib)
    budgets = Budgets(max_rel_error=s.max_rel_error, min_top1=s.min_top1)
    for speed in args.speeds:
        cuts = [
            replace(c, edge_ms=c.edge_ms * speed, encode_ms={k: v * speed for k, v in c.encode_ms.items()})
            for c in cost.cuts
        ]
        slow = replace(cost, cuts=cuts, edge_total_ms=cost.edge_total_ms * speed)
        planner = Planner(slow, budgets, meter, s.objective, input_is_8bit=s.input_is_8bit)
        for mbit in args.bandwidths:
            for factor in (0.9, 1.0):  # the probe reads a little under the shaped rate
                link = Link(mbit * factor, mbit * factor, 2 * args.delay_ms)
                best = planner.best(link)
                select(planner, link, args.cuts, args.top, best.candidate.label)  # what the driver will check
                # What the edge checks once served requests have corrected its planner (a slower edge and cloud
                # than profiled, a per-request overhead): each candidate it checks runs the model on the
                # calibration photos under its quota, minutes at 30x, and a re-plan waits for them.
                for edge_scale, cloud_scale, overhead in PREWARM_CORRECTIONS:
                    planner.edge_scale, planner.cloud_scale = edge_scale, cloud_scale
                    planner.best(replace(link, overhead_ms=overhead))
                planner.edge_scale = planner.cloud_scale = 1.0
                # The edge corrects E(k) cut by cut (Planner.edge_ms): in the grid, heads to the middle of the network
                # served at 0.67-0.8x their profile, late heads and the whole model at up to 1.26x.
                shaped = Planner(slow, budgets, meter, s.objective, input_is_8bit=s.input_is_8bit)
                middle = min(slow.cuts, key=lambda c: abs(c.edge_ms - 0.45 * slow.edge_total_ms))
                for _ in range(3):
                    shaped.observe_edge(middle.index, 0.75 * middle.edge_ms)
                    shaped.observe_edge(-1, 1.2 * slow.edge_total_ms)
                for overhead in (0.0, 25.0):
                    shaped.best(replace(link, overhead_ms=overhead))
            log(f"prewarm {speed:g}x {mbit:g} Mbit/s: {best.candidate.label}")
    return 0


#: (edge scale, cloud scale, per-request overhead ms) the edge's planner may learn from served requests (the real-ground
#: run measured edge-only at 1.15-1.4x its profile, the cloud at +10-13 ms, the link at +1 to +24 ms a request).
PREWARM_CORRECTIONS = ((1.3, 1.0, 0.0), (1.0, 1.5, 0.0), (1.3, 1.5, 10.0), (1.3, 1.5, 25.0), (1.5, 2.0, 25.0))


def cloud_profile_child(args: argparse.Namespace) -> int:
    """The ``cloudprofile`` subcommand: ask the cloud for its profile at the edge's input shape, as the edge will
    (it measures and caches it now), waiting for the cloud to come up. Imports no torch."""
    import grpc

    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc

    entry = json.loads(args.entry)
    request = si_pb2.ProfileRequest(model=entry["name"], input_shape=entry["input_shape"])
    deadline = time.monotonic() + args.ready_timeout_s
    with grpc.insecure_channel(args.cloud) as channel:
        while True:
            try:
                reply = si_grpc.SplitInferenceStub(channel).Profile(request, timeout=args.ready_timeout_s)
                log(f"cloud profile of {entry['name']}: whole model {reply.total_ms:.1f} ms")
                print(reply.total_ms, flush=True)
                return 0
            except grpc.RpcError as exc:
                if time.monotonic() > deadline or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(1.0)


def start_edge(
    lab: NetLab,
    args: argparse.Namespace,
    config: Path,
    log_path: Path,
    env: dict[str, str],
    edge_cpu: float,
) -> subprocess.Popen[bytes]:
    """An edge daemon in the edge namespace with ``config``, under ``edge_cpu`` cores (its own cgroup, the
    quota's CFS period) on ``--edge-cores``, logging to ``log_path``."""
    with open(log_path, "ab") as log:
        argv = [sys.executable, "-m", "edge_node.main", "--config", str(config)]
        proc = lab.popen(lab.edge_ns, argv, cpu_quota=min(edge_cpu, 1.0), stdout=log, stderr=log, cwd=ROOT, env=env)
    set_affinity(proc.pid, args.edge_cores)
    set_cfs_period(lab, proc.pid, edge_cpu, args.cfs_period_ms)
    return proc


def start_bottleneck_edge(
    lab: NetLab,
    args: argparse.Namespace,
    workdir: Path,
    entry: dict[str, Any],
    cloud: str,
    edge_cpu: float,
    tag: str,
) -> subprocess.Popen[bytes]:
    """A second edge daemon in the edge namespace, under the same CPU quota (its own cgroup) and cores, serving
    the model with the learned bottleneck (``--bottleneck``), its plan fixed at the latent. Started and ready
    before the edge under test starts profiling itself, so the two never compete for the CPU meanwhile."""
    config = {
        "model": bottleneck_entry(entry, args.bottleneck),
        "listen": f"127.0.0.1:{EDGE_PORT + 1}",
        "cloud": cloud,
        "plan": {"cut": "bottleneck_latent", "encoding": "entropy"},
        "request_timeout_s": args.request_timeout_s,
        "torch_threads": args.edge_threads,
    }
    path = write_yaml(workdir / f"edge-{tag}-bneck.yaml", config)
    env = daemon_env(workdir / "cache" / f"edge-{tag}-bneck")
    proc = start_edge(lab, args, path, workdir / f"edge-{tag}-bneck.log", env, edge_cpu)
    argv = [*SELF, "waitready", "--edge", f"127.0.0.1:{EDGE_PORT + 1}", "--ready-timeout-s", str(args.ready_timeout_s)]
    lab.run(lab.edge_ns, argv, timeout=args.ready_timeout_s + 30, cwd=ROOT, env=daemon_env(workdir)).check_returncode()
    print(f"[placement] bottleneck edge ready ({config['model']['bottleneck']})", flush=True)
    return proc


def wait_ready_child(args: argparse.Namespace) -> int:
    """The ``waitready`` subcommand: wait until the edge daemon at ``--edge`` has a plan in force (no torch)."""
    import grpc

    from protos.cleave.v1 import edge_pb2, edge_pb2_grpc

    deadline = time.monotonic() + args.ready_timeout_s
    with grpc.insecure_channel(args.edge) as channel:
        while True:
            try:
                status = edge_pb2_grpc.EdgeStub(channel).GetStatus(edge_pb2.GetStatusRequest(), timeout=10)
                if status.cloud_reachable:
                    return 0
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                log(f"edge {args.edge} not ready in {args.ready_timeout_s:.0f} s")
                return 1
            time.sleep(1.0)


def run_model(
    lab: NetLab,
    args: argparse.Namespace,
    workdir: Path,
    entry: dict[str, Any],
    cloud: str,
    edge_cpu: float,
    speed: dict[str, Any] | None = None,
    prewarmed: Path | None = None,
) -> dict:
    """Start an auto-planning edge daemon for one model under ``edge_cpu`` cores, run the driver over every
    bandwidth, stop the edge. ``speed``: the calibrated speed this quota stands for (recorded)."""
    model = entry["name"]
    tag = f"{model}-x{speed['target']:g}" if speed else model
    cache = workdir / "cache" / f"edge-{tag}"
    if prewarmed is not None:  # one cache for every edge speed and the drivers: what one checks, all reuse
        cache.mkdir(parents=True, exist_ok=True)
        for part in ("sizes", "distortion"):
            if (prewarmed / part).is_dir() and not (cache / part).exists():
                (cache / part).symlink_to(prewarmed / part, target_is_directory=True)
    env = daemon_env(cache)
    config = {
        "model": entry,
        "listen": f"127.0.0.1:{EDGE_PORT}",
        "cloud": cloud,
        "plan": {"cut": "auto"},
        "request_timeout_s": args.request_timeout_s,
        "torch_threads": args.edge_threads,
    }
    edge_yaml = write_yaml(workdir / f"edge-{tag}.yaml", config)
    lab.shape(args.bandwidths[0])  # the edge's first plan is made at the first bandwidth
    bneck = start_bottleneck_edge(lab, args, workdir, entry, cloud, edge_cpu, tag) if args.bottleneck else None
    edge = start_edge(lab, args, edge_yaml, workdir / f"edge-{tag}.log", env, edge_cpu)
    edge_cgroup = lab_cgroup(lab, edge.pid)
    out = workdir / f"result-{tag}.json"
    argv = [*SELF, "drive", "--edge", f"127.0.0.1:{EDGE_PORT}", "--cloud", cloud]
    argv += ["--entry", json.dumps(entry), "--bandwidths", ",".join(f"{b:g}" for b in args.bandwidths)]
    argv += ["--out", str(out)]
    for name in DRIVER_OPTIONS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if bneck is not None:
        argv += ["--bottleneck-edge", f"127.0.0.1:{EDGE_PORT + 1}"]
        argv += ["--bottleneck-entry", json.dumps(bottleneck_entry(entry, args.bottleneck))]
    started = time.monotonic()
    driver = None
    try:
        driver = Driver(lab, argv, env, args.model_timeout_s, edge_cgroup, args.edge_cores)
        code = driver.serve()
        driver.snapshot_cpu()
    finally:
        for proc in (edge, bneck) if bneck is not None else (edge,):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = json.loads(out.read_text()) if out.exists() else {"model": model, "bandwidths": []}
    # The quota each cell really ran under, and how hard it throttled (a check that the edge was the device asked).
    stats = driver.cpu_stats if driver is not None else []
    for i, cell in enumerate(result["bandwidths"]):
        if i + 1 < len(stats):
            cell["edge_cpu"] = cpu_check(stats[i], stats[i + 1], cell.get("seconds", 0.0))
    result["seconds"] = time.monotonic() - started
    result["edge_cpu_quota"] = edge_cpu
    if speed:
        result["speed"] = speed["target"]
        result["speed_achieved"] = speed["factor"]
        result["speed_calibration"] = speed
    if code != 0:  # keep the bandwidths it finished
        result["error"] = f"driver exited with {code}"
        result["edge_log_tail"] = (workdir / f"edge-{tag}.log").read_text(errors="replace").splitlines()[-15:]
    return result


def run(args: argparse.Namespace) -> int:
    ok, why = NetLab.available()
    if not ok:
        print(f"placement benchmark skipped: {why}")
        return 0
    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cleave-placement-"))
    workdir.mkdir(parents=True, exist_ok=True)
    edge_text = f"{args.edge_cpu:g} core" if not args.speeds else f"{','.join(f'{v:g}' for v in args.speeds)}x slower"
    print(
        f"[placement] {cuts_mode(args.cuts, args.top)}; models {', '.join(args.models)}; "
        f"bandwidths {', '.join(f'{b:g}' for b in args.bandwidths)} Mbit/s; one-way delay {args.delay_ms:g} ms; "
        f"edge {edge_text} / {args.edge_threads} thread(s); workdir {workdir}",
        flush=True,
    )
    entries = {m: prepare_model(workdir, m, args.size) for m in args.models}
    caches = {m: prewarm(args, workdir, entries[m]) for m in args.models} if args.prewarm else {}
    served = list(entries.values())
    if args.bottleneck:  # the cloud serves the bottlenecked variant too, for the second edge daemon
        served += [bottleneck_entry(e, args.bottleneck) for e in entries.values()]
    cloud_yaml = write_yaml(workdir / "cloud.yaml", {"models": served, "listen": f"127.0.0.1:{CLOUD_PORT}"})
    report = {"config": run_config(args), "models": []}
    if args.append:
        try:
            report = appended_to(args.out.with_suffix(".json"), report, args.models, args.speeds)
        except ValueError as exc:
            print(f"placement benchmark: --append: {exc}", file=sys.stderr)
            return 2
    earlier_s = report.get("seconds", 0.0)
    with NetLab(name="placement") as lab, open(workdir / "cloud.log", "ab") as cloud_log:
        argv = [sys.executable, "-m", "cloud_node.main", "--config", str(cloud_yaml)]
        argv += ["--threads", str(args.cloud_threads)] if args.cloud_threads else []
        env = daemon_env(workdir / "cache" / "cloud")
        cloud_proc = lab.popen(lab.cloud_ns, argv, stdout=cloud_log, stderr=cloud_log, cwd=ROOT, env=env)
        set_affinity(cloud_proc.pid, args.cloud_cores)
        relay = lab.relay(lab.cloud_ns, f"{lab.cloud_ip}:0", f"127.0.0.1:{CLOUD_PORT}", args.delay_ms)
        if relay.proc is not None:
            set_affinity(relay.proc.pid, args.cloud_cores)
        cloud_ms = {}
        for model in args.models:  # the cloud profiles itself now, alone, not while an edge daemon starts up
            argv = [*SELF, "cloudprofile", "--cloud", relay.address]
            argv += ["--entry", json.dumps(entries[model])]
            done = lab.run(lab.edge_ns, argv, timeout=args.ready_timeout_s, cwd=ROOT, env=daemon_env(workdir))
            print(done.stderr, end="", flush=True)
            done.check_returncode()
            cloud_ms[model] = float(done.stdout.strip().splitlines()[-1])
        # The cloud idles meanwhile: nothing else runs while the quotas are calibrated against its profile.
        calibrations = {m: calibrate_speeds(lab, args, entries[m], cloud_ms[m]) for m in args.models if args.speeds}
        report["config"]["speed_calibration"] = {**report["config"].get("speed_calibration", {}), **calibrations}
        for model in args.models:
            for speed in [calibrations[model]["speeds"][f"{v:g}"] for v in args.speeds] if args.speeds else [None]:
                cpu = speed["quota"] if speed else args.edge_cpu
                at = f", {speed['target']:g}x slower ({cpu:.4f} core)" if speed else ""
                print(f"[placement] {model}{at}: starting the edge daemon (cut: auto)", flush=True)
                cache = caches.get(model)
                report["models"].append(run_model(lab, args, workdir, entries[model], relay.address, cpu, speed, cache))
                report["seconds"] = earlier_s + time.monotonic() - started
                write_results(report, args.out)  # after every run: a run cut short keeps what it measured
    print_table(report)
    plot_all(report, args.out)
    write_map(report, args.out)
    print(f"[placement] {time.monotonic() - started:.0f} s; wrote {args.out}.json and plots; logs in {workdir}")
    return 0


#: Settings that must match for two runs' cells to belong in one report (``--append``).
SAME_SETTINGS = (
    "bandwidths_mbit",
    "one_way_delay_ms",
    "edge_cpu_quota",
    "edge_speed",
    "edge_threads",
    "cfs_period_ms",
    "cloud_threads",
    "cuts",
    "warmup",
    "repeats",
    "confirm_top",
    "size",
)


def appended_to(path: Path, report: dict[str, Any], models: list[str], speeds: list[float]) -> dict[str, Any]:
    """``report`` (a new run) continuing the one at ``path``: its models (at each speed) are kept unless measured
    again.

    Every (model, bandwidth) cell is measured on its own, so a long matrix can be run a few models at a
    time; the settings that shape a cell must be the same. Raises ValueError naming what differs.
    """
    if not path.exists():
        return report
    previous = json.loads(path.read_text())
    config = report["config"]
    differs = [k for k in SAME_SETTINGS if previous["config"].get(k) != config.get(k)]
    if differs:
        raise ValueError(f"{path} was measured with other settings: {', '.join(differs)}")
    again = {(m, s) for m in models for s in (speeds or [None])}
    kept = [m for m in previous["models"] if (m["model"], m.get("speed")) not in again]
    config["models"] = list(dict.fromkeys([m["model"] for m in kept] + list(models)))
    config["speeds"] = sorted({m["speed"] for m in kept if m.get("speed")} | set(speeds))
    config["speed_calibration"] = {
        **previous["config"].get("speed_calibration", {}),
        **config.get("speed_calibration", {}),
    }
    config["runs"] = previous["config"].get("runs", 1) + 1
    return {"config": config, "models": kept, "seconds": previous.get("seconds", 0.0)}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "models": list(args.models),
        "bandwidths_mbit": list(args.bandwidths),
        "one_way_delay_ms": args.delay_ms,
        "edge_speed": "slowdown factors, calibrated" if args.speeds else "fixed quota",
        "speeds": list(args.speeds),
        "edge_cpu_quota": "calibrated per speed" if args.speeds else args.edge_cpu,
        "edge_threads": args.edge_threads,
        "cfs_period_ms": args.cfs_period_ms,
        "cloud_threads": args.cloud_threads or "default",
        "cores": {"cloud": args.cloud_cores or "any", "edge": args.edge_cores or "any"},
        "passes": args.passes,
        "cuts": args.cuts,
        "cuts_mode": cuts_mode(args.cuts, args.top),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "confirm_top": args.confirm,
        "final_round": {"passes": args.final_passes, "repeats": args.final_repeats},
        "speedup_round": {"passes": args.speedup_passes, "repeats": args.speedup_repeats},
        "size": args.size,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "latency": "client-side median per request (app -> edge daemon -> answer)",
        "prediction_error": "Plan.predicted total vs the edge daemon's own request time (timing.total_ms)",
    }


def cuts_mode(cuts: str, top: int) -> str:
    always = "edge-only, every cloud-only encoding (int8c, JPEG, WebP)"
    if cuts == "all":
        return f"cuts=all: every cut at its best encoding within the budget, {always}"
    return (
        f"cuts={cuts}: {cuts} evenly spaced cuts at their best encoding within the budget + the planner's top {top} "
        f"placements at every encoding within the budget (predicted <= {TOP_ENCODINGS_WITHIN:g}x the best) + every "
        f"baseline's cut + the edge's choice + {always}"
    )


def write_results(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for _, c in cells(report):
        c["split_bound"] = split_bound(c)
    report["summary"] = summarize(report)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out.with_suffix(".json"))


def cells(report: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(model, per-bandwidth result) for every measured cell; the model is named with its edge speed, if any."""
    for m in report["models"]:
        for cell in m.get("bandwidths", []):
            yield run_title(m), cell


def run_title(m: dict[str, Any]) -> str:
    """A model run's name: the model, and the edge's slowdown (target and achieved) where it was calibrated."""
    return f"{m['model']} {m['speed']:g}x ({m['speed_achieved']:.1f}x)" if m.get("speed") else m["model"]


def short_model(m: dict[str, Any]) -> str:
    return m["model"].removesuffix("_pretrained")


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Medians across models and bandwidths, against the issue's targets (ratio <= 1.05, error <= 10%)."""
    ratios = [c["ratio"] for _, c in cells(report) if c.get("ratio")]
    budget_ratios = [c["ratio_within_budget"] for _, c in cells(report) if c.get("ratio_within_budget")]
    errors = [abs(c["chosen_error"]) for _, c in cells(report) if c.get("chosen_error") is not None]
    all_errors = [c["median_abs_error"] for _, c in cells(report) if c.get("median_abs_error") is not None]
    auto = [auto_vs_pinned(c) for _, c in cells(report) if auto_vs_pinned(c)]
    speedups: dict[str, list[float]] = {}
    for _, c in cells(report):
        s = c["strategies"]
        for name in ("edge-only", "cloud-raw", "cloud-jpeg", "cloud-webp", "neurosurgeon"):
            if s.get(name) and s.get("cleave"):
                speedups.setdefault(name, []).append(s[name] / s["cleave"])
    med = statistics.median
    over_alt = [c["speedup_over_best_alternative"] for _, c in cells(report) if c.get("speedup_over_best_alternative")]
    split_cells = [c for _, c in cells(report) if c.get("oracle_is_split") and c.get("speedup_over_best_alternative")]
    split_speedups = [c["speedup_over_best_alternative"] for c in split_cells]
    bounds = [(c, b) for _, c in cells(report) if (b := split_bound(c)) and b["max_speedup"]]
    split_goal = all(v >= SPLIT_GOAL for v in split_speedups) if split_speedups else None
    goals = {
        "median_ratio_within_budget <= 1.05": bool(budget_ratios) and med(budget_ratios) <= 1.05,
        "max_ratio_within_budget <= 1.15": bool(budget_ratios) and max(budget_ratios) <= 1.15,
        f"split cells: speed-up >= {SPLIT_GOAL}": split_goal,
    }
    return {
        "cells": len(ratios),
        "goals": goals,
        "cells_where_oracle_is_split": len(split_cells),
        "speedup_over_best_alternative_in_split_cells": split_speedups,
        "split_speedup_bound": {
            "in_split_cells": [b["max_speedup"] for c, b in bounds if c.get("oracle_is_split")],
            "max": max((b["max_speedup"] for _, b in bounds), default=None),
            "zero_byte_max": max((b["any_zero_byte"]["max_speedup"] for _, b in bounds), default=None),
            f"cells_reaching_{SPLIT_GOAL}": sum(1 for _, b in bounds if b["max_speedup"] >= SPLIT_GOAL),
        },
        "median_speedup_over_best_alternative": med(over_alt) if over_alt else None,
        "median_ratio": med(ratios) if ratios else None,
        "max_ratio": max(ratios) if ratios else None,
        "median_ratio_within_budget": med(budget_ratios) if budget_ratios else None,
        "max_ratio_within_budget": max(budget_ratios) if budget_ratios else None,
        "median_abs_error_chosen": med(errors) if errors else None,
        "median_abs_error_all_candidates": med(all_errors) if all_errors else None,
        "median_speedup_of_cleave_over": {k: med(v) for k, v in speedups.items()},
        "median_auto_vs_pinned": med(auto) if auto else None,
    }


#: The issue's goal: where the in-budget oracle is a split, Cleave's plan at least this much faster than the better of
#: edge-only and in-budget cloud-only.
SPLIT_GOAL = 1.5


def split_bound(cell: dict[str, Any]) -> dict[str, Any] | None:
    """How fast any split measured in ``cell`` could be at best, and its speed-up over the cell's best alternative
    (the better of edge-only and in-budget cloud-only) then: an upper bound on what a split can win in this cell.

    Every measured split within the accuracy budget is bounded below by its measured edge, encode, decode and cloud
    stages plus a wire that costs only the cell's nominal RTT and its measured bytes at the nominal bandwidth
    (``bound_ms``); the bound leaves out the link's per-request overhead and download, the result's decoding and
    the client's call into the edge daemon, which the alternative's client-side median includes. The zero-byte
    bound also drops the bytes: of the best split (``zero_byte_*``), and the lowest of any split
    (``any_zero_byte``); ``goal_bytes`` is what the best split could send and still be bounded at
    :data:`SPLIT_GOAL` (against its ``bytes_up``: how much smaller its features would have to be). A split is a
    real one as the report's ``oracle_is_split`` decides it (:func:`splits_the_network`, from ``head_ms_predicted``
    and the edge-only candidate's): a cut that only re-encodes the input is sending the image. None when the cell
    measured no such split, and in results from before candidates recorded ``head_ms_predicted``
    (``placement.json``), where that cannot be decided.
    """
    candidates = cell.get("candidates", [])
    if not any(c["kind"] == "split" for c in candidates):
        return None
    edge = next((c for c in candidates if c["kind"] == "edge"), None)
    if edge is None:
        raise ValueError(f"cell at {cell.get('bandwidth_mbit')} Mbit/s: no edge-only candidate (head_ms_predicted)")
    if "head_ms_predicted" not in edge:
        return None
    for key in ("nominal_rtt_ms", "bandwidth_mbit"):
        if cell.get(key) is None:
            raise ValueError(f"cell at {cell.get('bandwidth_mbit')} Mbit/s lacks {key!r}")
    rtt, mbit = cell["nominal_rtt_ms"], cell["bandwidth_mbit"]
    bounds = []
    for c in candidates:
        measured = c.get("measured") or {}
        if not (
            measured.get("samples")
            and c.get("within_budget")
            and splits_the_network(c["kind"], c["head_ms_predicted"], edge["head_ms_predicted"])
        ):
            continue
        st = measured["stages_ms"]
        compute = st["edge_ms"] + st["encode_ms"] + st["decode_ms"] + st["cloud_ms"] + rtt
        wire = measured["bytes_up"] * 8 / (mbit * 1000.0)  # bytes at Mbit/s, in ms
        bounds.append((compute + wire, compute, c["label"], measured["bytes_up"]))
    if not bounds:
        return None
    bound, zero_byte, label, bytes_up = min(bounds)
    any_zero_byte, any_label = min((b[1], b[2]) for b in bounds)
    alt = (cell.get("best_alternative") or {}).get("e2e_ms")
    return {
        "label": label,
        "bytes_up": bytes_up,
        "bound_ms": bound,
        "max_speedup": alt / bound if alt else None,
        "zero_byte_bound_ms": zero_byte,
        "zero_byte_max_speedup": alt / zero_byte if alt else None,
        # The most that split could send and still be bounded at the goal's speed-up (0: not even with no bytes).
        "goal_bytes": max(0.0, (alt / SPLIT_GOAL - zero_byte) * mbit * 1000.0 / 8) if alt else None,
        # Were bytes free, another split (a larger tensor, a costlier codec) may bound lower: the lowest of them.
        "any_zero_byte": {
            "label": any_label,
            "bound_ms": any_zero_byte,
            "max_speedup": alt / any_zero_byte if alt else None,
        },
        "splits": len(bounds),
    }


def auto_vs_pinned(cell: dict[str, Any]) -> float | None:
    """Cleave's latency under automatic planning over the same plan pinned (> 1: re-planning costs the edge)."""
    pinned = cell.get("confirm_round", {}).get(cell["cleave"]["label"])
    return cell["strategies"]["cleave"] / pinned["e2e_ms"] if pinned else None


def print_table(report: dict[str, Any]) -> None:
    print_real_table(report)
    head = (
        f"{'model':<13}{'Mbit/s':>7}  {'Cleave plan':<30}{'pred':>7}{'meas':>7}{'err':>6}  {'oracle best':<30}"
        f"{'ratio':>6}{'ratio*':>7}{'auto/pin':>9}" + "".join(f"{s:>13}" for s in STRATEGIES)
    )
    print(head)
    print("-" * len(head))
    for model, c in cells(report):
        chosen, oracle, s = c["cleave"], c["oracle"], c["strategies"]
        err, auto, budget = c.get("chosen_error"), auto_vs_pinned(c), c.get("ratio_within_budget")
        print(
            f"{model:<13}{c['bandwidth_mbit']:>7g}  {chosen['label'][:29]:<30}{chosen['predicted_ms']:>7.1f}"
            f"{chosen['measured']['edge_ms']:>7.1f}{_fmt(err, '+.0%'):>6}  {oracle['label'][:29]:<30}"
            f"{_fmt(c.get('ratio'), '.2f'):>6}{_fmt(budget, '.2f'):>7}{_fmt(auto, '.2f'):>9}"
            + "".join(f"{_fmt(s.get(k), '.1f'):>13}" for k in STRATEGIES)
        )
    print(
        "(ms. pred/meas/err: the chosen plan's predicted vs measured edge request time. ratio: chosen / oracle-best, "
        "both pinned, confirmation round; ratio*: oracle within the accuracy budget only. auto/pin: Cleave under "
        "automatic planning over its plan pinned. Strategies: client-side medians.)"
    )
    for m in report["models"]:
        if "error" in m:
            print(f"{m['model']}: FAILED: {m['error']}")
    print("summary:", json.dumps(report.get("summary") or summarize(report)))


def _speed_label(m: dict[str, Any]) -> str:
    """A model run's edge speed for the tables: ``target/achieved`` slowdown, ``-`` for a fixed quota."""
    return f"{m['speed']:g}x/{m['speed_achieved']:.1f}x" if m.get("speed") else "-"


def print_real_table(report: dict[str, Any]) -> None:
    """Per cell (edge speed x bandwidth): Cleave's plan, the oracle within the budget, and what a user would do
    without Cleave (the better of edge-only and an in-budget cloud-only)."""
    head = (
        f"{'model':<22}{'edge':>11}{'Mbit/s':>7}  {'Cleave plan':<28}{'pred':>7}{'meas':>7}  "
        f"{'oracle (in budget)':<28}{'ms':>7}{'ratio':>6}  {'best of edge/cloud-only':<24}{'ms':>7}{'speed-up':>9}"
    )
    print(head)
    print("-" * len(head))
    for m in report["models"]:
        speed = _speed_label(m)
        for c in m.get("bandwidths", []):
            chosen, budget, alt = c["cleave"], c.get("oracle_within_budget") or c["oracle"], c.get("best_alternative")
            split = "*" if c.get("oracle_is_split") else " "
            print(
                f"{short_model(m)[:21]:<22}{speed:>11}{c['bandwidth_mbit']:>7g}  {chosen['label'][:27]:<28}"
                f"{chosen['predicted_ms']:>7.1f}{chosen['measured']['e2e_ms']:>7.1f}  {split}{budget['label'][:26]:<27}"
                f"{budget['e2e_ms']:>7.1f}{_fmt(c.get('ratio_within_budget'), '.2f'):>6}  "
                f"{(alt or {}).get('label', '-')[:23]:<24}{_fmt((alt or {}).get('e2e_ms'), '.1f'):>7}"
                f"{_fmt(c.get('speedup_over_best_alternative'), '.2f'):>9}"
            )
            if b := c.get("bottleneck"):
                plan = "it is the plan" if b["becomes_plan"] else f"the plan stays {b['plan']}"
                print(
                    f"{'':<40}bottleneck {b['label']}: {_fmt(b['measured_ms'], '.1f')} ms, "
                    f"{b['bytes_up_predicted']} B, "
                    f"top-1 {b['top1']:.2f}; offered to the planner, {plan}"
                )
    print(
        "(ms, client-side medians. edge: target/achieved slowdown of the edge's whole model against one cloud core. "
        "pred: the plan's predicted request time; meas: Cleave planning by itself. oracle: the fastest candidate "
        "within the accuracy budget, measured pinned (* = a split); ratio: Cleave's plan pinned / oracle, "
        "paired final round. speed-up: the better of edge-only and in-budget cloud-only over Cleave's plan, the three "
        "side by side in the paired speed-up round.)"
    )
    summary = report.get("summary") or summarize(report)
    print("goals:", json.dumps(summary.get("goals")))
    print_split_bounds(report)


def print_split_bounds(report: dict[str, Any]) -> None:
    """Per cell, the fastest any measured in-budget split could be (:func:`split_bound`) and its speed-up over the
    best alternative then: whether the 1.5x goal is within any split's reach."""
    head = (
        f"{'model':<22}{'edge':>11}{'Mbit/s':>7}{'split?':>7}  {'best alternative':<18}{'ms':>7}  "
        f"{'best split bound':<30}{'ms':>7}{'max':>7}{'0 B':>7}{'any 0 B':>8}{'B now':>8}{'B at goal':>10}"
    )
    print(head)
    print("-" * len(head))
    for m in report["models"]:
        speed = _speed_label(m)
        for c in m.get("bandwidths", []):
            alt, b = c.get("best_alternative") or {}, split_bound(c) or {}
            print(
                f"{short_model(m)[:21]:<22}{speed:>11}{c['bandwidth_mbit']:>7g}"
                f"{'yes' if c.get('oracle_is_split') else 'no':>7}  {alt.get('label', '-')[:17]:<18}"
                f"{_fmt(alt.get('e2e_ms'), '.1f'):>7}  {b.get('label', '-')[:29]:<30}"
                f"{_fmt(b.get('bound_ms'), '.1f'):>7}"
                f"{_fmt(b.get('max_speedup'), '.2f'):>7}{_fmt(b.get('zero_byte_max_speedup'), '.2f'):>7}"
                f"{_fmt((b.get('any_zero_byte') or {}).get('max_speedup'), '.2f'):>8}"
                f"{_fmt(b.get('bytes_up'), '.0f'):>8}{_fmt(b.get('goal_bytes'), '.0f'):>10}"
            )
    print(
        "(split?: the in-budget oracle is a split. best split bound: the measured in-budget split with the lowest "
        "edge + encode + decode + cloud stages + nominal RTT + its bytes at the nominal bandwidth; max: the best "
        "alternative over that bound, the most any split could win here; 0 B: the same split with no bytes to send; "
        "any 0 B: the most any split could win with no bytes to send; B now: that split's bytes; B at goal: the most "
        f"it could send and still be bounded at {SPLIT_GOAL}x, 0 where not even with no bytes.)"
    )


STAGES = ("edge", "encode", "link", "cloud")


def stage_errors(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Where predictions go wrong: per edge speed and stage, measured minus predicted (ms) and measured over predicted,
    medians over every measured candidate.

    Stages as the edge daemon times them: edge (head or whole model), encode, link (round trip minus the cloud's
    time: upload + RTT + download + per-request overhead), cloud (decode + tail); plus ``other`` (the daemon's time
    not in a stage) and ``client`` (the app's call into the daemon, not predicted).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in report["models"]:
        rows: dict[str, list[tuple[float, float]]] = {}
        for cell in m.get("bandwidths", []):
            for c in cell["candidates"]:
                me = c.get("measured") or {}
                if not me.get("samples"):
                    continue
                p, st = c["predicted"], me["stages_ms"]
                pairs = {
                    "edge": (p["edge_ms"], st["edge_ms"]),
                    "encode": (p["encode_ms"], st["encode_ms"]),
                    "link": (p["upload_ms"] + p["rtt_ms"] + p["download_ms"], st["link_ms"]),
                    "cloud": (p["decode_ms"] + p["cloud_ms"], st["decode_ms"] + st["cloud_ms"]),
                }
                if c["kind"] == "edge":
                    pairs = {"edge": pairs["edge"]}
                elif p["edge_ms"] <= 0.5:
                    del pairs["edge"]  # no head to speak of (cloud-only, a cut at the input)
                for k, v in pairs.items():
                    rows.setdefault(k, []).append(v)
                staged = sum(st.values())
                rows.setdefault("other", []).append((0.0, me["edge_ms"] - staged))
                rows.setdefault("client", []).append((0.0, me["e2e_ms"] - me["edge_ms"]))
                rows.setdefault("total", []).append((c["predicted_ms"], me["edge_ms"]))
        out[run_title(m)] = {
            k: {
                "n": len(v),
                "meas_minus_pred_ms": statistics.median(b - a for a, b in v),
                "meas_over_pred": statistics.median(b / a for a, b in v if a > 0.5)
                if any(a > 0.5 for a, _ in v)
                else None,
            }
            for k, v in rows.items()
        }
    return out


def print_stage_errors(report: dict[str, Any]) -> None:
    print(f"{'run':<40}{'stage':<8}{'n':>5}{'meas-pred ms':>14}{'meas/pred':>11}")
    for run_name, stages in stage_errors(report).items():
        for stage, e in stages.items():
            print(
                f"{run_name[:39]:<40}{stage:<8}{e['n']:>5}{e['meas_minus_pred_ms']:>+14.1f}"
                f"{_fmt(e['meas_over_pred'], '.2f'):>11}"
            )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---- plots -----------------------------------------------------------------------------------------------------
def plot_all(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    models = [m for m in report["models"] if m.get("bandwidths")]
    if not models:
        return
    plot_strategies(models, out.with_suffix(".png"))
    plot_prediction(models, out.parent / f"{out.name}_prediction.png")
    plot_cuts(models, out.parent / f"{out.name}_cuts.png")


def write_map(report: dict[str, Any], out: Path) -> None:
    """Where a split wins between the measured bandwidths (``benchmarks/speedup_map.py``), beside the results as
    ``<out>_map.{json,png}``; runs at one fixed quota (no edge speeds) or without an in-budget split have none."""
    from benchmarks import speedup_map

    if not any(m.get("speed") and m.get("bandwidths") for m in report["models"]):
        return
    try:
        speedup_map.write(report, out.parent / f"{out.name}_map.json", out.with_suffix(".json").name)
    except ValueError as exc:
        print(f"[placement] no speed-up map: {exc}")


def plain_log_axes(ax: Any, axes: str = "xy") -> None:
    """Log axes labelled with plain numbers at 1-2-3-5-7 steps (matplotlib's defaults collide or vanish)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in [ax.xaxis] * ("x" in axes) + [ax.yaxis] * ("y" in axes):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def plot_strategies(models: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(models), figsize=(max(4.6 * len(models), 6.4), 4.2), squeeze=False)
    styles = {"cleave": ("o-", 2.4), "oracle": ("k*:", 1.2)}
    for ax, m in zip(axes[0], models, strict=True):
        bws = [c["bandwidth_mbit"] for c in m["bandwidths"]]
        for name in STRATEGIES:
            ys = [c["strategies"].get(name) for c in m["bandwidths"]]
            fmt, lw = styles.get(name, (".--", 1.0))
            ax.plot(bws, [y if y else float("nan") for y in ys], fmt, lw=lw, label=name, alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(bws, [f"{b:g}" for b in bws])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("link bandwidth, Mbit/s (both directions)")
        ax.set_ylabel("measured latency, ms (median)")
        ax.set_title(run_title(m), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        plain_log_axes(ax, "y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Measured latency per strategy (shaped link, edge under a CPU quota)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prediction(models: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 6))
    markers = "os^Dv<>"
    lo, hi = float("inf"), 0.0
    for i, m in enumerate(models):
        for j, c in enumerate(m["bandwidths"]):
            pts = [(k["predicted_ms"], k["measured"]["edge_ms"]) for k in c["candidates"] if k.get("measured")]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
            label = f"{run_title(m)} {c['bandwidth_mbit']:g} Mbit/s"
            ax.scatter(xs, ys, s=14, marker=markers[j % len(markers)], color=f"C{i}", alpha=0.6, label=label)
            ch = c["cleave"]
            ax.scatter(
                [ch["predicted_ms"]],
                [ch["measured"]["edge_ms"]],
                s=120,
                marker="*",
                color=f"C{i}",
                edgecolors="k",
                zorder=5,
            )
    if hi > 0:
        line = [lo * 0.8, hi * 1.2]
        ax.plot(line, line, "k-", lw=0.8)
        ax.fill_between(line, [v * 0.9 for v in line], [v * 1.1 for v in line], color="k", alpha=0.08, label="±10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted latency, ms (planner)")
    ax.set_ylabel("measured latency, ms (edge daemon request time, median)")
    ax.set_title("Predicted vs measured latency, every measured candidate\n(★ = the plan Cleave chose)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    plain_log_axes(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cuts(models: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    ncols = max(len(m["bandwidths"]) for m in models)
    fig, axes = plt.subplots(len(models), ncols, figsize=(5 * ncols, 3.4 * len(models)), squeeze=False)
    for row, m in zip(axes, models, strict=True):
        for ax, c in zip(row, m["bandwidths"], strict=False):
            splits = sorted(
                (k for k in c["candidates"] if k["kind"] == "split" and k.get("measured")),
                key=lambda k: (k["cut_index"], k["encoding"] == "raw+none"),
            )
            best = [k for k in splits if k["encoding"] != "raw+none"]
            ax.plot(
                [k["cut_index"] for k in best],
                [k["measured"]["e2e_ms"] for k in best],
                "o",
                ms=4,
                label="measured (best encoding)",
            )
            ax.plot([k["cut_index"] for k in best], [k["predicted_ms"] for k in best], "x", ms=5, label="predicted")
            by_label = {k["label"]: k for k in c["candidates"]}
            for k, color in ((by_label.get("edge-only"), "C2"), (by_label.get("cloud-only int8c"), "C3")):
                if k and k.get("measured"):
                    ax.axhline(k["measured"]["e2e_ms"], color=color, ls="--", lw=1, label=k["label"])
            ax.axhline(c["cleave"]["measured"]["e2e_ms"], color="k", lw=1, label=f"Cleave: {c['cleave']['label']}")
            ax.set_yscale("log")
            ax.set_xlabel("cut (node index)")
            ax.set_ylabel("latency, ms")
            ax.set_title(f"{run_title(m)} at {c['bandwidth_mbit']:g} Mbit/s", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
            plain_log_axes(ax, "y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ================================================================================================================
# The driver: runs inside the edge namespace, talks to the edge daemon on the namespace's loopback
# ================================================================================================================
@dataclass
class Measurement:
    """Requests under one plan: client-side and edge-side times, stage times, where they ran."""

    e2e: list[float] = field(default_factory=list)
    edge: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    placements: dict[str, int] = field(default_factory=dict)
    plans: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0

    def add(self, e2e_ms: float, reply: Any, placement: str, plan: str) -> None:
        t = reply.timing
        self.e2e.append(e2e_ms)
        self.edge.append(t.total_ms)
        stages = {
            "edge_ms": t.edge_compute_ms,
            "encode_ms": t.encode_ms,
            "link_ms": t.transfer_ms,
            "decode_ms": t.cloud_decode_ms,
            "cloud_ms": t.cloud_compute_ms + t.cloud_queue_ms + t.cloud_encode_ms,
            "result_decode_ms": t.decode_ms,
        }
        for k, v in stages.items():
            self.stages.setdefault(k, []).append(v)
        self.placements[placement] = self.placements.get(placement, 0) + 1
        self.plans[plan] = self.plans.get(plan, 0) + 1
        self.bytes_up = reply.bytes_up

    def summary(self) -> dict[str, Any]:
        med = statistics.median
        return {
            "e2e_ms": med(self.e2e),
            "edge_ms": med(self.edge),
            "samples": len(self.e2e),
            "e2e_all_ms": [round(v, 2) for v in self.e2e],
            "stages_ms": {k: med(v) for k, v in self.stages.items()},
            "placements": self.placements,
            "plans": self.plans,
            "bytes_up": self.bytes_up,
        }


@dataclass
class Pick:
    """A candidate the oracle measures, and why it is in the set."""

    scored: Any  # partitioner.planner.Scored
    reasons: list[str]
    within_budget: bool = True  # baselines (cloud-only int8c/JPEG) may break the accuracy budget


class Session:
    """The driver's view: the edge daemon (EdgeClient), the benchmark's own copy of the planner, the inputs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from cleave_cli.client import EdgeClient
        from cleave_cli.images import synthetic_images
        from partitioner.models import ModelSpec
        from partitioner.photos import builtin_photos

        self.args = args
        self.spec = ModelSpec.from_dict(json.loads(args.entry))
        self.client = EdgeClient(args.edge)
        # A second edge daemon serving the model with the learned bottleneck, its plan fixed at the latent.
        self.bclient = EdgeClient(args.bottleneck_edge) if getattr(args, "bottleneck_edge", "") else None
        self.bottleneck: Any = None  # (Candidate, Distortion) once build_planner has measured it
        if self.spec.pretrained:
            # Real photos, other crops than the 8 calibration inputs the planner measures on.
            self.inputs = builtin_photos(self.spec.input_shape, 12)[8:]
        else:
            self.inputs = synthetic_images(4, self.spec.input_shape, seed=7)
        self.planner: Any = None
        self.info: dict[str, Any] = {}
        self._n = 0
        from edge_node.link import LinkMonitor

        self.monitor = LinkMonitor(window=9)  # the link as the edge sees it: its probe, and the requests' overhead

    # -- start-up --------------------------------------------------------------------------------------------
    def build_planner(self) -> None:
        """The planner the edge daemon built, rebuilt here from the same inputs (its cached profile included)."""
        from edge_node.config import AutoPlanSettings
        from partitioner.costmodel import CostModel
        from partitioner.loaded import LoadedModel
        from partitioner.photos import calibration_inputs
        from partitioner.planner import Budgets, Planner, cached_distortion, distortion_meter
        from partitioner.profile import from_proto
        from protos.cleave.v1 import split_inference_pb2 as si_pb2
        from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
        from runtime.serving import open_channel

        model = LoadedModel.load(self.spec)
        edge = edge_profile(model)
        reply = si_grpc.SplitInferenceStub(open_channel(self.args.cloud)).Profile(
            si_pb2.ProfileRequest(model=model.name), timeout=300
        )
        cloud = from_proto(reply)
        s = AutoPlanSettings()  # the edge runs with the defaults
        calib = calibration_inputs(model.spec, s.calibration, s.calibration_inputs)  # as the edge calibrates
        # The edge's own disk caches (this driver shares its CLEAVE_CACHE): the same bytes and distortions.
        cost = CostModel.measure(model, edge, cloud, calib[: s.byte_samples], cache=True)
        budgets = Budgets(max_rel_error=s.max_rel_error, min_top1=s.min_top1)
        meter = cached_distortion(distortion_meter(model, calib, record=True), model, calib)
        self.planner = Planner(cost, budgets, meter, s.objective, input_is_8bit=s.input_is_8bit)
        if self.bclient is not None:
            self.bottleneck = load_bottleneck(model, self.args, edge.total_ms / cloud.total_ms, calib)
        self.info = {
            "cuts": len(model.graph.cuts),
            "candidates": len(self.planner.candidates),
            "edge_profile_total_ms": edge.total_ms,
            "cloud_profile_total_ms": cloud.total_ms,
            "edge_slowdown": edge.total_ms / cloud.total_ms,
            "budgets": asdict(budgets),
        }
        log(
            f"{model.name}: {self.info['cuts']} cuts, {self.info['candidates']} candidates; profiled whole model "
            f"{edge.total_ms:.1f} ms on the edge, {cloud.total_ms:.1f} ms in the cloud "
            f"({self.info['edge_slowdown']:.1f}x)"
        )

    # -- requests --------------------------------------------------------------------------------------------
    def request(self, client: Any = None) -> tuple[float, Any]:
        x = self.inputs[self._n % len(self.inputs)].unsqueeze(0)
        self._n += 1
        t0 = time.perf_counter()
        reply = (client or self.client).infer(x, timeout=self.args.request_timeout_s)
        return (time.perf_counter() - t0) * 1e3, reply

    def measure(self, repeats: int, into: Measurement | None = None, client: Any = None) -> Measurement:
        """Warm-up, then up to ``repeats`` requests (fewer when the candidate budget runs out; at least one).

        Every answered request of the edge daemon under test also teaches the benchmark's planner (:meth:`learn`),
        as it teaches the edge's. ``client``: another edge daemon (the bottleneck's), whose answers teach nothing."""
        from protos.cleave.v1 import edge_pb2

        learn = self.learn if client is None else (lambda _reply: None)
        started = time.monotonic()
        for _ in range(self.args.warmup):
            learn(self.request(client)[1])
            if time.monotonic() - started > self.args.candidate_budget_s / 2:
                break
        m, started = into or Measurement(), time.monotonic()
        for _ in range(repeats):
            ms, reply = self.request(client)
            label = plan_label(reply.plan)
            m.add(ms, reply, edge_pb2.Placement.Name(reply.placement), label)
            learn(reply)
            if time.monotonic() - started > self.args.candidate_budget_s:
                break
        return m

    def pin(self, candidate: Any) -> None:
        if candidate.kind == "edge":
            self.client.pin("edge", "fp32")
        else:
            self.client.pin(candidate.cut_index if candidate.kind == "split" else "cloud", candidate.encoding)

    def measure_pinned(self, candidates: dict[str, Any], repeats: int) -> dict[str, Measurement]:
        """Each of ``candidates`` (label -> Candidate) pinned and measured, side by side: ``--passes`` round-robin
        passes over all of them, each pass pinning a candidate, ``--warmup`` requests, then its share of ``repeats``.

        Interleaved, a host whose speed drifts (other work, the edge's CPU quota, a probe) moves every candidate
        alike instead of whichever happened to be measured then. A candidate whose requests have taken
        ``--candidate-budget-s`` in all is not measured again (it keeps at least one request)."""
        passes = max(1, min(self.args.passes, repeats))
        shares = [repeats // passes + (1 if i < repeats % passes else 0) for i in range(passes)]
        out = {label: Measurement() for label in candidates}
        spent = dict.fromkeys(candidates, 0.0)
        for share in shares:
            for label, candidate in candidates.items():
                if out[label].e2e and spent[label] > self.args.candidate_budget_s:
                    continue
                started = time.monotonic()
                self.measure_candidate(candidate, share, into=out[label])
                spent[label] += time.monotonic() - started
        return out

    def measure_candidate(self, candidate: Any, repeats: int, into: Measurement | None = None) -> Measurement:
        """``candidate`` pinned, then :meth:`measure`; a bottleneck's latent is measured on its own daemon, whose plan
        is fixed at the latent (nothing to pin)."""
        if is_bottleneck(candidate):
            return self.measure(repeats, into=into, client=self.bclient)
        self.pin(candidate)
        return self.measure(repeats, into=into)

    def paired_passes(self, picks: dict[str, Pick], labels: list[str], passes: int, repeats: int) -> list[dict]:
        """``passes`` passes over ``labels``, each candidate measured back to back (:meth:`measure_candidate`,
        ``repeats`` requests after a warm-up), the order rotating by one each pass (two labels: alternating).
        Per pass, label -> median ms: a host whose speed drifts moves every candidate of a pass alike."""
        out = []
        for i in range(passes):
            k = i % len(labels)
            out.append(
                {
                    label: statistics.median(self.measure_candidate(picks[label].scored.candidate, repeats).e2e)
                    for label in labels[k:] + labels[:k]
                }
            )
        return out

    def learn(self, reply: Any) -> None:
        """What one answered request measured, into the benchmark's planner and link estimate, as the edge daemon
        feeds its own (edge and cloud compute against their profiles; the per-request overhead on the wire)."""
        from protos.cleave.v1 import edge_pb2

        t = reply.timing
        if reply.placement == edge_pb2.EDGE_ONLY:
            self.planner.observe_edge(-1, t.edge_compute_ms)
            return
        if reply.placement not in (edge_pb2.SPLIT, edge_pb2.CLOUD_ONLY):
            return  # a local fallback says nothing about the cloud
        cut = 0 if reply.placement == edge_pb2.CLOUD_ONLY else reply.plan.cut_index
        if cut:
            self.planner.observe_edge(cut, t.edge_compute_ms)
        self.planner.observe_cloud(cut, t.cloud_compute_ms)
        self.monitor.record_transfer(reply.bytes_up, reply.bytes_down, t.transfer_ms)

    def corrections(self) -> dict[str, float]:
        """What the requests so far taught the benchmark's planner (recorded with each cell)."""
        return {
            "edge_scale": self.planner.edge_scale,
            "cloud_scale": self.planner.cloud_scale,
            "overhead_ms": self.monitor.snapshot().overhead_ms,
        }

    # -- one bandwidth ---------------------------------------------------------------------------------------
    def shape(self, mbit: float) -> None:
        print(MSG + json.dumps({"shape": mbit}), flush=True)
        answer = sys.stdin.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"shaping to {mbit} Mbit/s failed: {answer!r}")
        time.sleep(0.5)  # let queues left from the previous rate drain

    def run_bandwidth(self, mbit: float) -> dict[str, Any]:
        from partitioner.costmodel import Link
        from protos.cleave.v1 import edge_pb2

        started = time.monotonic()
        self.shape(mbit)
        # A Replan without a plan: the edge probes the link and plans now, from its own profiles.
        plan = self.client.stub.Replan(edge_pb2.ReplanRequest(), timeout=self.args.ready_timeout_s)
        status = self.client.status()
        self.monitor.record_probe(status.link.rtt_ms, status.link.up_mbps, status.link.down_mbps)
        time.sleep(self.args.settle_s)  # what the re-plan started (its probe's last bytes, a new session) settles
        chosen_label = plan_label(plan)
        log(
            f"{mbit:g} Mbit/s: edge probed {status.link.up_mbps:.2f}/{status.link.down_mbps:.2f} Mbit/s, RTT "
            f"{status.link.rtt_ms:.1f} ms;"
            f" planned {chosen_label} (predicted {plan.predicted.total_ms:.1f} ms)"
        )
        # Cleave planning by itself, in two halves: now and after the pinned candidates (re-planned then), so the
        # drift that interleaving spreads over the candidates does not all land on, or miss, Cleave's block.
        first = max(self.args.repeats // 2, 1)
        cleave = self.measure(first)  # still under automatic planning (re-plans would show in .plans)
        # Predictions with what the requests so far taught (this cell's Cleave requests, earlier cells): the
        # overhead per request comes from the requests' wire times against the edge's probe.
        link = Link(status.link.up_mbps, status.link.down_mbps, status.link.rtt_ms, self.monitor.snapshot().overhead_ms)
        learned = self.corrections()
        mine = self.planner.best(link)
        picks = select(self.planner, link, self.args.cuts, self.args.top, chosen_label)
        offered = self.offer_bottleneck(link, picks, mine)
        log(f"{mbit:g} Mbit/s: measuring {len(picks)} candidates ({self.args.cuts}), interleaved")
        measured = self.measure_pinned({k: p.scored.candidate for k, p in picks.items()}, self.args.repeats)
        confirm = self.confirm(picks, measured, chosen_label)
        final = self.final_round(picks, chosen_label, budget_oracle(picks, confirm))
        speedup = self.speedup_round(picks, chosen_label, alternatives_of(picks, measured, confirm))
        if self.args.repeats > first:
            self.client.stub.Replan(edge_pb2.ReplanRequest(), timeout=self.args.ready_timeout_s)
            time.sleep(self.args.settle_s)
            self.measure(self.args.repeats - first, into=cleave)
        cell = self.cell(mbit, link, plan, cleave, picks, measured, confirm)
        cell["corrections"] = learned
        with_final_round(cell, final)
        with_speedup_round(cell, speedup)
        if offered is not None:
            cell["bottleneck"] = self.bottleneck_record(offered, measured, confirm)
        cell["benchmark_planner_choice"] = mine.candidate.label
        cell["benchmark_planner_agrees"] = mine.candidate.label == chosen_label
        cell["seconds"] = time.monotonic() - started
        log(
            f"{mbit:g} Mbit/s: Cleave {cell['strategies']['cleave']:.1f} ms, oracle {cell['oracle']['label']} "
            f"{cell['oracle']['e2e_ms']:.1f} ms, ratio {cell['ratio']:.3f}, prediction error "
            f"{cell['chosen_error']:+.1%} ({cell['seconds']:.0f} s)"
        )
        return cell

    def offer_bottleneck(self, link: Any, picks: dict[str, Pick], best: Any) -> dict[str, Any] | None:
        """Offer the learned bottleneck's candidate to the benchmark's planner beside its best plan: scored with the
        same corrections, judged by the same accuracy budget (top-1 agreement with the plain model). Adds it to
        ``picks`` (measured like the others). Returns what the planner then plans, or None without a bottleneck."""
        if self.bottleneck is None:
            return None
        candidate, distortion = self.bottleneck
        b = self.planner.budgets
        rejected = ""
        if b.min_top1 is not None and distortion.top1 < b.min_top1:
            rejected = f"top-1 {distortion.top1:.2f} < {b.min_top1}"
        elif b.max_rel_error is not None and distortion.rel_error > b.max_rel_error:
            rejected = f"rel error {distortion.rel_error:.3g} > {b.max_rel_error}"
        from partitioner.planner import Scored

        scored = self.planner.score(candidate, link)
        scored = Scored(candidate, scored.predicted, scored.cost_ms, distortion, rejected)
        picks[candidate.label] = Pick(scored, ["bottleneck"], within_budget=not rejected)
        plan = scored if not rejected and scored.cost_ms < best.cost_ms else best
        return {"label": candidate.label, "plan": plan.candidate.label, "plan_predicted_ms": plan.predicted.total_ms}

    def bottleneck_record(
        self, offered: dict[str, Any], measured: dict[str, Measurement], confirm: dict[str, Measurement]
    ) -> dict[str, Any]:
        label = offered["label"]
        m = confirm.get(label) or measured.get(label)
        plan = confirm.get(offered["plan"]) or measured.get(offered["plan"])
        return {
            **offered,
            "becomes_plan": offered["plan"] == label,
            "top1": self.bottleneck[1].top1,
            "bytes_up_predicted": self.bottleneck[0].bytes_up,
            "measured_ms": m.summary()["e2e_ms"] if m and m.e2e else None,
            "plan_measured_ms": plan.summary()["e2e_ms"] if plan and plan.e2e else None,
        }

    def confirm(self, picks: dict[str, Pick], measured: dict[str, Measurement], chosen: str) -> dict[str, Measurement]:
        """Re-measure the first pass's fastest few and the chosen plan: the best of many noisy medians is biased low."""
        ranked = sorted(measured, key=lambda k: statistics.median(measured[k].e2e))
        feasible = [k for k in ranked if picks[k].within_budget]
        labels = list(dict.fromkeys([*ranked[: self.args.confirm], *feasible[: self.args.confirm], chosen]))
        return self.measure_pinned({k: picks[k].scored.candidate for k in labels if k in picks}, self.args.repeats)

    def final_round(self, picks: dict[str, Pick], chosen: str, oracle: str | None) -> dict[str, Any] | None:
        """Cleave's plan against the in-budget oracle alone, in ``--final-passes`` passes, the two back to back
        (their order alternating), each after a warm-up, ``--final-repeats`` requests each. Per pass the ratio of
        their medians (paired: a host whose speed drifts moves both); the result is the median of those ratios.
        None when the plan is the oracle (or either is not a measured candidate)."""
        if not oracle or chosen == oracle or chosen not in picks or oracle not in picks or self.args.final_passes < 1:
            return None
        passes = self.paired_passes(picks, [chosen, oracle], self.args.final_passes, self.args.final_repeats)
        ratios = [p[chosen] / p[oracle] for p in passes]
        return {
            "chosen": chosen,
            "oracle": oracle,
            "passes": passes,
            "paired_ratios": ratios,
            "ratio": statistics.median(ratios),
        }

    def speedup_round(
        self, picks: dict[str, Pick], chosen: str, alternatives: dict[str, float]
    ) -> dict[str, Any] | None:
        """Cleave's plan against what a user would do without it, side by side: the plan, edge-only and the best
        in-budget cloud-only of the earlier rounds (``alternatives``, label -> median ms), in ``--speedup-passes``
        passes, each pinned after a warm-up for ``--speedup-repeats`` requests, their order rotating. Per pass the
        speed-up is the better alternative's median over the plan's (paired: a host whose speed drifts moves all
        three); the result is the median of those. None without alternatives, or when the plan is one of them."""
        edge = [k for k in alternatives if picks[k].scored.candidate.kind == "edge"]
        cloud = sorted((k for k in alternatives if k not in edge), key=alternatives.get)
        rivals = edge[:1] + cloud[:1]
        if not rivals or chosen in rivals or chosen not in picks or self.args.speedup_passes < 1:
            return None
        labels = [chosen, *rivals]
        passes = self.paired_passes(picks, labels, self.args.speedup_passes, self.args.speedup_repeats)
        speedups = [min(p[k] for k in rivals) / p[chosen] for p in passes]
        return {
            "chosen": chosen,
            "alternatives": rivals,
            "passes": passes,
            "paired_speedups": speedups,
            "speedup": statistics.median(speedups),
            "medians_ms": {k: statistics.median(p[k] for p in passes) for k in labels},
        }

    def cell(
        self,
        mbit: float,
        link: Any,
        plan: Any,
        cleave: Measurement,
        picks: dict[str, Pick],
        measured: dict[str, Measurement],
        confirm: dict[str, Measurement],
    ) -> dict[str, Any]:
        """The JSON record of one model at one bandwidth."""
        candidates = [candidate_record(picks[k], measured[k]) for k in picks]
        by_label = {c["label"]: c for c in candidates}
        confirmed = {k: m.summary() for k, m in confirm.items()}
        oracle_label = min(confirmed, key=lambda k: confirmed[k]["e2e_ms"])
        budget_label = budget_oracle(picks, confirm) or oracle_label
        chosen_label = plan_label(plan)
        chosen_conf = confirmed.get(chosen_label)
        cleave_s = cleave.summary()
        predicted = plan.predicted.total_ms
        errors = [abs(c["error"]) for c in candidates if c.get("error") is not None]
        baselines = {name: self.planner.baseline(name, link).candidate.label for name in BASELINE_NAMES}
        strategies = {name: _e2e(by_label.get(label)) for name, label in baselines.items()}
        strategies["cleave"] = cleave_s["e2e_ms"]
        strategies["oracle"] = confirmed[oracle_label]["e2e_ms"]
        alternatives = alternatives_of(picks, measured, confirm)
        best_alt = min(alternatives, key=alternatives.get) if alternatives else None
        return {
            "bandwidth_mbit": mbit,
            "nominal_rtt_ms": 2 * self.args.delay_ms,
            "link_probed": asdict(link),
            "cleave": {
                "label": chosen_label,
                "reason": plan.reason,
                "predicted_ms": predicted,
                "predicted": _breakdown(plan.predicted),
                "measured": cleave_s,
                "replanned_during_measurement": len(cleave.plans) > 1,
            },
            "chosen_error": (predicted - cleave_s["edge_ms"]) / cleave_s["edge_ms"] if predicted else None,
            "oracle": {"label": oracle_label, **confirmed[oracle_label]},
            "ratio": chosen_conf["e2e_ms"] / confirmed[oracle_label]["e2e_ms"] if chosen_conf else None,
            "oracle_within_budget": {"label": budget_label, **confirmed[budget_label]},
            "oracle_is_split": is_real_split(picks[budget_label].scored.candidate, self.planner),
            "alternatives": alternatives,
            "best_alternative": {"label": best_alt, "e2e_ms": alternatives[best_alt]} if best_alt else None,
            "speedup_over_best_alternative": alternatives[best_alt] / cleave_s["e2e_ms"] if best_alt else None,
            "ratio_within_budget": chosen_conf["e2e_ms"] / confirmed[budget_label]["e2e_ms"] if chosen_conf else None,
            "confirm_round": confirmed,
            "baselines": baselines,
            "strategies": strategies,
            "median_abs_error": statistics.median(errors) if errors else None,
            "candidates": candidates,
        }


BASELINE_NAMES = {
    "neurosurgeon": "neurosurgeon",
    "edge-only": "edge-only",
    "cloud-raw": "cloud-raw",
    "cloud-jpeg": "cloud-jpeg",
    "cloud-webp": "cloud-webp",
}


#: A split whose head does less than this share of the model's edge time only re-encodes the input (e.g. cut 1 of
#: EfficientNet-Lite0, ``size``): it counts as sending the image, not as splitting the network.
MIN_HEAD_SHARE = 0.05


def is_real_split(candidate: Any, planner: Any) -> bool:
    edge_total = next(c.edge_ms for c in planner.candidates if c.kind == "edge")
    return splits_the_network(candidate.kind, candidate.edge_ms, edge_total)


def splits_the_network(kind: str, head_ms: float, edge_total_ms: float) -> bool:
    """Whether a candidate whose head takes ``head_ms`` (predicted) of a model whose edge-only run takes
    ``edge_total_ms`` (predicted) is a real split (:data:`MIN_HEAD_SHARE`)."""
    return kind == "split" and head_ms >= MIN_HEAD_SHARE * edge_total_ms


def _e2e(record: dict[str, Any] | None) -> float | None:
    return record["measured"]["e2e_ms"] if record and record.get("measured") else None


def _breakdown(p: Any) -> dict[str, float]:
    keys = ("edge_ms", "encode_ms", "upload_ms", "rtt_ms", "decode_ms", "cloud_ms", "download_ms", "total_ms")
    return {k: getattr(p, k) for k in keys}


def candidate_record(pick: Pick, m: Measurement) -> dict[str, Any]:
    """A measured candidate: its prediction (and breakdown) next to the measurement; error = (pred - meas) / meas."""
    s, c = pick.scored, pick.scored.candidate
    summary = m.summary()
    p = s.predicted
    return {
        "label": c.label,
        "kind": c.kind,
        "cut_index": c.cut_index,
        "cut_name": c.cut_name,
        "encoding": c.encoding,
        "head_ms_predicted": c.edge_ms,
        "reasons": pick.reasons,
        "within_budget": pick.within_budget,
        "rejected": s.rejected,
        "bytes_up_predicted": c.bytes_up,
        "predicted_ms": p.total_ms,
        "predicted": {**asdict(p), "link_ms": p.upload_ms + p.rtt_ms + p.download_ms},
        "distortion": asdict(s.distortion) if s.distortion else None,
        "measured": summary,
        "error": (p.total_ms - summary["edge_ms"]) / summary["edge_ms"],
    }


def plan_label(plan: Any) -> str:
    """An ``Edge`` Plan (or a reply's plan) as the planner labels its candidates (``Candidate.label``)."""
    from compressor import EncodingSpec
    from protos.cleave.v1 import edge_pb2

    if plan.placement == edge_pb2.EDGE_ONLY:
        return "edge-only"
    enc = str(EncodingSpec.from_proto(plan.encoding))
    if plan.placement == edge_pb2.CLOUD_ONLY or plan.cut_index == 0:
        return f"cloud-only {enc}"
    return f"{plan.cut_name}#{plan.cut_index} {enc}"


# ---- which candidates the oracle measures --------------------------------------------------------------------
def placement_key(candidate: Any) -> int:
    """Where a candidate splits: -1 edge-only, 0 cloud-only, k a cut."""
    return -1 if candidate.kind == "edge" else candidate.cut_index


def best_per_placement(planner: Any, ordered: list[Any], keys: Iterable[int]) -> dict[int, Any]:
    """The planner's best feasible candidate (within the budgets) at each placement in ``keys``."""
    wanted, out = set(keys), {}
    for scored in ordered:
        key = placement_key(scored.candidate)
        if key in wanted and key not in out:
            checked = planner._check(scored)  # the planner's own budget check, in its own cost order
            if not checked.rejected:
                out[key] = checked
    return out


#: At the planner's top placements, every encoding within the budget predicted at most this many times the best
#: plan's cost is measured (slower ones cannot be the oracle, and at 1 Mbit/s fp32 features take 10 s a request).
TOP_ENCODINGS_WITHIN = 2.0


def every_encoding_within_budget(planner: Any, ordered: list[Any], keys: Iterable[int], max_ms: float) -> list[Any]:
    """Every candidate at the placements ``keys`` whose encoding is within the budgets, predicted under ``max_ms``."""
    wanted = set(keys)
    candidates = (s for s in ordered if placement_key(s.candidate) in wanted and s.cost_ms <= max_ms)
    return [s for s in map(planner._check, candidates) if not s.rejected]


def feasible_top_placements(planner: Any, ordered: list[Any], count: int) -> tuple[list[int], float]:
    """The planner's ``count`` best placements within the budgets (each at its best encoding), and the best cost.

    Walks the candidates in cost order as :meth:`Planner.rank` does, but checks no more encodings at a placement
    once one fits: each check runs the tail on the calibration photos."""
    keys: list[int] = []
    best_ms = None
    for scored in ordered:
        key = placement_key(scored.candidate)
        if key in keys or planner._check(scored).rejected:
            continue
        keys.append(key)
        best_ms = scored.cost_ms if best_ms is None else best_ms
        if len(keys) >= count:
            break
    return keys, best_ms if best_ms is not None else float("inf")


def spaced(keys: list[int], count: int) -> list[int]:
    if count >= len(keys):
        return keys
    return sorted({keys[round(i * (len(keys) - 1) / max(count - 1, 1))] for i in range(count)})


def select(planner: Any, link: Any, cuts: str, top: int, chosen_label: str) -> dict[str, Pick]:
    """The oracle's candidates at ``link`` (see the module docstring), keyed by label, in cut order."""
    ordered = sorted((planner.score(c, link) for c in planner.candidates), key=lambda s: s.cost_ms)
    split_keys = sorted({c.cut_index for c in planner.candidates if c.kind == "split"})
    picks: dict[str, Pick] = {}

    def add(scored: Any, reason: str) -> None:
        picks.setdefault(scored.candidate.label, Pick(scored, [])).reasons.append(reason)

    keys = split_keys if cuts == "all" else spaced(split_keys, int(cuts))
    for scored in best_per_placement(planner, ordered, [-1, 0, *keys]).values():
        add(scored, "every cut" if cuts == "all" else "spaced")
    if cuts != "all":
        keys, best_ms = feasible_top_placements(planner, ordered, top)
        for scored in every_encoding_within_budget(planner, ordered, keys, TOP_ENCODINGS_WITHIN * best_ms):
            add(scored, f"top-{top}")
    for scored in ordered:  # every cloud-only candidate: the input lossless, as JPEG and as WebP
        if scored.candidate.kind == "cloud":
            add(scored, "cloud-only")
    for name in BASELINE_NAMES:
        base = planner.baseline(name, link)
        add(base, f"baseline {name}")
        for scored in best_per_placement(planner, ordered, [placement_key(base.candidate)]).values():
            add(scored, f"best encoding at the {name} cut")
    for scored in ordered:  # the edge's own choice is always measured
        if scored.candidate.label == chosen_label:
            add(planner._check(scored), "cleave")
            break
    for pick in picks.values():  # baselines are scored without budgets: check them too (cached for the others)
        checked = planner._check(pick.scored)
        pick.scored, pick.within_budget = checked, not checked.rejected
    return dict(sorted(picks.items(), key=lambda kv: (placement_key(kv[1].scored.candidate), kv[0])))


def budget_oracle(picks: dict[str, Pick], confirm: dict[str, Measurement]) -> str | None:
    """The fastest candidate of the confirmation round within the accuracy budget (None when none is)."""
    feasible = {k: statistics.median(m.e2e) for k, m in confirm.items() if m.e2e and picks[k].within_budget}
    return min(feasible, key=feasible.get) if feasible else None


def alternatives_of(
    picks: dict[str, Pick], measured: dict[str, Measurement], confirm: dict[str, Measurement]
) -> dict[str, float]:
    """What a user would do without Cleave, label -> median ms: edge-only, and every cloud-only candidate within the
    accuracy budget (the confirmation round's median where it has one, else the candidates' round's)."""
    out = {}
    for label, pick in picks.items():
        kind = pick.scored.candidate.kind
        if kind == "edge" or (kind == "cloud" and pick.within_budget):
            m = confirm.get(label) if confirm.get(label) and confirm[label].e2e else measured.get(label)
            if m is not None and m.e2e:
                out[label] = statistics.median(m.e2e)
    return out


def with_speedup_round(cell: dict[str, Any], round_: dict[str, Any] | None) -> dict[str, Any]:
    """``cell`` with its speed-up over the best alternative from the speed-up round (see :meth:`Session.speedup_round`)
    when there was one; the speed-up of Cleave planning by itself over the alternatives' own rounds is kept beside
    it (``speedup_unpaired``)."""
    if round_ is not None:
        cell["speedup_round"] = round_
        cell["speedup_unpaired"] = cell["speedup_over_best_alternative"]
        cell["speedup_over_best_alternative"] = round_["speedup"]
    return cell


def with_final_round(cell: dict[str, Any], final: dict[str, Any] | None) -> dict[str, Any]:
    """``cell`` with its in-budget ratio from the final round (see :meth:`Session.final_round`), when there was one.

    The oracle is the fastest of the confirmation round, so its median there is biased low, and one median of 4
    moved by up to 1.5x between rounds (conv2d_17#75 int6 at 10x, 5 Mbit/s: 182.8 ms, then 273.9): fresh paired
    samples say how much slower the plan is. The confirmation round's ratio is kept beside it. A final ratio under
    1 means the plan was the oracle after all: 1.0."""
    if final is not None:
        cell["final_round"] = final
        cell["ratio_within_budget_confirm"] = cell["ratio_within_budget"]
        cell["ratio_within_budget"] = max(final["ratio"], 1.0)
    return cell


def is_bottleneck(candidate: Any) -> bool:
    """Whether ``candidate`` is a learned bottleneck's latent (served by its own edge daemon in this benchmark)."""
    return getattr(candidate, "encoding", "") == "entropy"


def bottleneck_candidate(model: Any, bmodel: Any, cloud: Any, edge_slowdown: float, calib: Any) -> tuple[Any, Any]:
    """The learned bottleneck's candidate for the plain ``model``'s planner, and its distortion against that model.

    ``bmodel``: the model with the bottleneck inserted; ``cloud``: the cloud's profile of it. E and C come from that
    profile, the head's part scaled by ``edge_slowdown`` (the edge's whole-model time over the cloud's, from their
    profiles of the plain model); bytes from range-coding the latent of the calibration photos. Distortion: top-1
    agreement and relative output error of ``bmodel`` against ``model`` on those photos, which is what the accuracy
    budget means for every other candidate.
    """
    import torch

    from edge_node.config import AutoPlanSettings
    from partitioner.costmodel import ENTROPY, CostModel
    from partitioner.planner import Distortion
    from partitioner.profile import scaled

    edge = scaled(cloud, edge_slowdown, host="edge (the cloud's profile scaled)")
    samples = calib[: AutoPlanSettings().byte_samples]
    cost = CostModel.measure(bmodel, edge, cloud, samples, feature_encodings=(), input_encodings=())
    candidate = next(c for c in cost.candidates((), (), include_uncompressed=False) if c.encoding == ENTROPY)
    with torch.inference_mode():
        ref, out = model.module(calib), bmodel.module(calib)
    rel = float((out - ref).abs().max() / ref.abs().max())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return candidate, Distortion(rel, top1)


def load_bottleneck(model: Any, args: argparse.Namespace, edge_slowdown: float, calib: Any) -> tuple[Any, Any]:
    """:func:`bottleneck_candidate` for ``--bottleneck-entry``, the cloud profiling the bottlenecked model (asked over
    ``Profile``, as the edge asks for the plain one)."""
    from partitioner.loaded import LoadedModel
    from partitioner.models import ModelSpec
    from partitioner.profile import from_proto
    from protos.cleave.v1 import split_inference_pb2 as si_pb2
    from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
    from runtime.serving import open_channel

    spec = ModelSpec.from_dict(json.loads(args.bottleneck_entry))
    bmodel = LoadedModel.load(spec)
    reply = si_grpc.SplitInferenceStub(open_channel(args.cloud)).Profile(
        si_pb2.ProfileRequest(model=bmodel.name, input_shape=list(spec.input_shape)), timeout=600
    )
    candidate, distortion = bottleneck_candidate(model, bmodel, from_proto(reply), edge_slowdown, calib)
    log(
        f"bottleneck {candidate.label}: {candidate.bytes_up} B, top-1 agreement {distortion.top1:.2f} with the plain"
        " model"
    )
    return candidate, distortion


def edge_profile(model: Any) -> Any:
    """The profile the edge daemon measured of itself, read from its cache directory (this driver's CLEAVE_CACHE).

    Read from the file rather than through ``cached_profile``: the cache key includes the process's CPU quota and
    thread count, which differ here, and a miss would profile this (unthrottled) process instead.
    """
    from partitioner.profile import Profile, cache_dir

    found = []
    for path in sorted(cache_dir().glob("*.json")):
        profile = Profile.from_json(path.read_text())
        if profile.fingerprint == model.fingerprint:
            found.append(profile)
    if len(found) != 1:
        raise RuntimeError(
            f"expected one profile of {model.name} in the edge's cache {cache_dir()}, found {len(found)}"
        )
    return found[0]


def log(text: str) -> None:
    print(f"[drive {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_planned(edge: str, timeout_s: float) -> Any:
    """Wait until the edge daemon serves and has made its first plan from its own profiles and probe.

    Only grpc and the stubs are imported here (no torch): this process must not compete for CPU with the edge
    while it profiles itself.
    """
    import grpc

    from protos.cleave.v1 import edge_pb2, edge_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(edge) as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        while True:
            try:
                status = stub.GetStatus(edge_pb2.GetStatusRequest(), timeout=10)
                if status.auto_plan and status.plan.reason.startswith("planned") and not status.planner_error:
                    return status
                why = status.planner_error
            except grpc.RpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"edge did not plan in {timeout_s:.0f}s: {why}")
            time.sleep(1.0)


def drive(args: argparse.Namespace) -> int:
    """The ``drive`` subcommand (inside the edge namespace): every bandwidth for one model; JSON to ``--out``."""
    started = time.monotonic()
    status = wait_planned(args.edge, args.ready_timeout_s)  # before importing torch: the edge is profiling itself
    log(f"edge planned after {time.monotonic() - started:.0f} s: {status.plan.reason}")
    session = Session(args)
    session.build_planner()
    # A device serves before anyone measures it: a few requests under the edge's first plan teach both planners
    # what serving costs here (the edge's speed against its profile, the per-request overhead).
    session.measure(args.repeats)
    result: dict[str, Any] = {"model": session.spec.name, **session.info, "bandwidths": []}
    for mbit in args.bandwidths:
        result["bandwidths"].append(session.run_bandwidth(mbit))
        Path(args.out).write_text(json.dumps(result))
    session.client.close()
    return 0


# ================================================================================================================
# Command line
# ================================================================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "cmd",
        nargs="?",
        default="run",
        choices=["run", "drive", "report", "stages", "calibrate", "prewarm", "cloudprofile", "waitready"],
        help="run (default); report: table and plots again from the JSON; stages: predicted vs measured per stage; "
        "drive: internal (the driver)",
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    p.add_argument(
        "--append", action="store_true", help="add these models to the results already at --out (same settings)"
    )
    p.add_argument("--bandwidths", default=",".join(f"{b:g}" for b in BANDWIDTHS), help="Mbit/s, comma-separated")
    p.add_argument("--cuts", default="6", help='"all", or N: N evenly spaced cuts + --top + baselines (default 6)')
    p.add_argument("--top", type=int, default=3, help="with --cuts N: also the planner's top placements")
    p.add_argument("--repeats", type=int, default=4, help="measured requests per candidate (median)")
    p.add_argument(
        "--passes", type=int, default=2, help="round-robin passes over a cell's candidates; repeats split among them"
    )
    p.add_argument("--warmup", type=int, default=1, help="requests per candidate and pass before measuring")
    p.add_argument("--settle-s", type=float, default=1.0, help="pause after each re-plan before measuring")
    p.add_argument("--confirm", type=int, default=2, help="fastest candidates re-measured with the chosen plan")
    p.add_argument(
        "--final-passes",
        type=int,
        default=3,
        help="passes of the final round: the plan and the in-budget oracle alone, back to back (0: none; the ratio "
        "then comes from the confirmation round)",
    )
    p.add_argument(
        "--final-repeats", type=int, default=2, help="requests per candidate and final pass, after a warm-up"
    )
    p.add_argument(
        "--speedup-passes",
        type=int,
        default=3,
        help="passes of the speed-up round: the plan, edge-only and the best in-budget cloud-only back to back "
        "(0: none; the speed-up then sets Cleave planning by itself against the candidates' own rounds)",
    )
    p.add_argument(
        "--speedup-repeats", type=int, default=3, help="requests per candidate and speed-up pass, after a warm-up"
    )
    p.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay added by the relay (RTT += 2x)")
    p.add_argument(
        "--speeds",
        default=",".join(f"{v:g}" for v in SPEEDS),
        help='edge slowdowns against one cloud core, comma-separated; each sets a calibrated CPU quota ("none": '
        "one fixed --edge-cpu)",
    )
    p.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="each edge encodes every cut and checks distortions itself (slow under a small quota)",
    )
    p.add_argument("--speed-tolerance", type=float, default=0.08, help="accept a quota within this of its slowdown")
    p.add_argument("--speed-tries", type=int, default=4, help="quota corrections per slowdown, at most")
    p.add_argument("--edge-cpu", type=float, default=0.5, help="with --speeds none: edge daemon CPU quota, cores")
    p.add_argument("--cfs-period-ms", type=float, default=10.0, help="CFS period of the edge's CPU quota")
    p.add_argument("--edge-threads", type=int, default=1, help="edge daemon torch threads")
    p.add_argument(
        "--cloud-cores", default="", help='cores for the cloud daemon and the relay (taskset list, "0"; default: any)'
    )
    p.add_argument(
        "--edge-cores", default="", help='cores for the edge daemon, its calibration and the driver ("1"; default: any)'
    )
    p.add_argument(
        "--cloud-threads", type=int, default=1, help="cloud daemon torch threads (default 1: one core; 0: torch's)"
    )
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument(
        "--bottleneck",
        type=Path,
        help="artifacts of a bottleneck compression job (docs/bottleneck.md): its latent is a candidate, served by a "
        "second edge daemon under the same quota and offered to the planner",
    )
    p.add_argument("--candidate-budget-s", type=float, default=8.0, help="stop a candidate's repeats after this")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="per request (and the edge's deadline)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="for the edge daemon's first plan")
    p.add_argument("--model-timeout-s", type=float, default=5400.0, help="for one model's driver, all bandwidths")
    p.add_argument("--workdir", help="weights, configs, profile caches and logs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS / "placement_real", help="results path without suffix")
    # the driver's own arguments (set by the parent)
    p.add_argument("--edge", help=argparse.SUPPRESS)
    p.add_argument("--cloud", help=argparse.SUPPRESS)
    p.add_argument("--entry", help=argparse.SUPPRESS)
    p.add_argument("--bottleneck-edge", default="", help=argparse.SUPPRESS)
    p.add_argument("--bottleneck-entry", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.bandwidths = [float(b) for b in args.bandwidths.split(",") if b]
    args.speeds = [] if args.speeds == "none" else [float(v) for v in args.speeds.split(",") if v]
    if any(v < 1 for v in args.speeds):
        p.error("--speeds: slowdown factors >= 1 (or none)")
    if args.cuts != "all" and not (args.cuts.isdigit() and int(args.cuts) >= 2):
        p.error("--cuts: 'all' or an integer >= 2")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "drive":
        return drive(args)
    if args.cmd == "calibrate":
        return calibrate_child(args)
    if args.cmd == "prewarm":
        return prewarm_child(args)
    if args.cmd == "cloudprofile":
        return cloud_profile_child(args)
    if args.cmd == "waitready":
        return wait_ready_child(args)
    if args.cmd == "report":
        report = json.loads(args.out.with_suffix(".json").read_text())
        write_results(report, args.out)
        print_table(report)
        plot_all(report, args.out)
        write_map(report, args.out)
        return 0
    if args.cmd == "stages":
        print_stage_errors(json.loads(args.out.with_suffix(".json").read_text()))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
