"""Compression jobs as Ray tasks (issue 16, item 2) on a local Ray instance with bounded resources
(tests/conftest.py's ``ray_instance``, shared with the other Ray modules): a sweep job runs as Ray
tasks with the same results as the local pool, reports progress, lands its artifacts in the shared
directory, survives a restart of the job table, and can be cancelled (its tasks stop). Skipped,
saying why, where Ray is not installed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cloud_node.config import JobsConfig, Sandbox
from cloud_node.jobs import JobManager
from cloud_node.jobs.ray_tasks import RayJobs, RayResources
from cloud_node.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, sha256_file
from protos.cleave.v1 import compression_pb2 as pb

CPUS = 2  # the shared Ray instance's (tests/conftest.py: ray_instance)
# Deterministic for a seeded model on one thread: everything a sweep point reports but its latency.
SAME = ("ratio", "bits", "size_bytes", "macs", "parameters", "accuracy")


def ray_jobs(shared: Path) -> RayJobs:
    return RayJobs(shared, RayResources(num_cpus=1, memory_bytes=256 << 20))


def dataset_chunks() -> list[pb.UploadChunk]:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, inputs=rng.standard_normal((8, 3, 32, 32)).astype(np.float32), labels=rng.integers(0, 10, 8))
    data = buf.getvalue()
    return [pb.UploadChunk(header=pb.UploadHeader(format=pb.DATASET_NPZ)), pb.UploadChunk(data=data)]


def sweep_spec(dataset_id: str, ratios: list[float], bits: list[int]) -> pb.JobSpec:
    model = pb.ModelRef(torchvision="resnet18", input_shape=[1, 3, 32, 32], num_classes=10, seed=3)
    return pb.JobSpec(
        engine="sweep", model=model, dataset_id=dataset_id, sweep=pb.SweepOptions(ratios=ratios, bits=bits)
    )


def eventually(condition: Callable[[], bool], within_s: float, poll_s: float) -> bool:
    """Whether ``condition`` holds within ``within_s``, asked every ``poll_s``."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def all_cpus_free(ray, within_s: float) -> bool:
    """Whether every CPU of the instance is free again (no task of ours still holds one) in time."""
    return eventually(lambda: ray.available_resources().get("CPU") == CPUS, within_s, 0.2)


def run_to_end(m: JobManager, job_id: str) -> list[JobRecord]:
    seen = list(m.watch(job_id))
    assert seen[-1].state == SUCCEEDED, seen[-1].message
    return seen


def sweep_points(m: JobManager, job_id: str) -> dict[tuple, dict]:
    points = json.loads(m.artifact(job_id, "sweep.json").path.read_text())["points"]
    return {(p["ratio"], p["bits"]): {k: p.get(k) for k in SAME} for p in points}


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_sweep_job_runs_as_ray_tasks_like_the_local_pool(ray_instance, tmp_path: Path) -> None:
    ray = ray_instance
    local = JobManager(JobsConfig(dir=str(tmp_path / "local"), sweep_parallelism=2))
    shared = tmp_path / "shared"
    on_ray = JobManager(JobsConfig(dir=str(tmp_path / "ray")), ray=ray_jobs(shared))
    ratios, bits = [0.0, 0.5], [32, 4]
    ids = {}
    for name, m in (("local", local), ("ray", on_ray)):
        data = m.upload(dataset_chunks())
        ids[name] = m.submit(sweep_spec(data.id, ratios, bits)).id
        m.start()
    try:
        seen = run_to_end(on_ray, ids["ray"])
        run_to_end(local, ids["local"])
        # Same points, same numbers (latency aside), whichever executor ran them.
        expected = sweep_points(local, ids["local"])
        assert sweep_points(on_ray, ids["ray"]) == expected and len(expected) == 4
        # Progress came back from the Ray task while it ran.
        stages = [j.stage for j in seen if j.state == RUNNING]
        assert any(s.endswith("/4 configurations") for s in stages), stages
        assert any(0 < j.progress < 1 for j in seen if j.state == RUNNING)
        report = json.loads(on_ray.artifact(ids["ray"], "report.json").path.read_text())
        assert report["executor"] == "ray" and report["sandbox"][0] == "ray task"
        assert json.loads(local.artifact(ids["local"], "report.json").path.read_text())["executor"] == "local"
        # The artifacts are in the shared directory, whole; the job's scratch there is gone.
        job = on_ray.get(ids["ray"])
        assert {a.name for a in job.artifacts} >= {"sweep.json", "sweep.png", "report.json"}
        for a in job.artifacts:
            assert a.path.is_relative_to(shared) and sha256_file(a.path) == a.sha256
        assert not any((shared).glob("*/work/*"))
        assert all_cpus_free(ray, 30), ray.available_resources()  # every task gave its CPU back
    finally:
        local.close()
        on_ray.close()
    # The job table stays the crash-safe SQLite one: a new manager finds the job and checks its artifacts.
    again = JobManager(JobsConfig(dir=str(tmp_path / "ray")), ray=ray_jobs(shared))
    try:
        assert again.get(ids["ray"]).state == SUCCEEDED
        assert sweep_points(again, ids["ray"]) == expected
    finally:
        again.close()


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_cancelling_a_ray_sweep_stops_its_tasks(ray_instance, tmp_path: Path) -> None:
    ray = ray_instance
    shared = tmp_path / "shared"
    m = JobManager(JobsConfig(dir=str(tmp_path / "ray")), ray=ray_jobs(shared))
    data = m.upload(dataset_chunks())
    job = m.submit(sweep_spec(data.id, [0.0, 0.2, 0.4, 0.6], [32, 8, 4]))  # 12 points: far from done
    m.start()
    try:
        # Every CPU taken: the job task is waiting on its points, which run as tasks of their own.
        deadline = time.monotonic() + 120
        while ray.available_resources().get("CPU", 0) > 0 or m.get(job.id).state != RUNNING:
            assert time.monotonic() < deadline, "the sweep's points never started on Ray"
            time.sleep(0.1)
        assert m.cancel(job.id).state == CANCELLED
        assert all_cpus_free(ray, 60), ray.available_resources()  # ray.cancel(force=True) ended them
        time.sleep(1)  # a task that had not stopped would now finish the job
        final = m.get(job.id)
        assert final.state == CANCELLED and not final.artifacts
        assert not list((shared).glob("*/artifacts/*"))
    finally:
        m.close()


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_ray_job_past_its_time_limit_fails_and_a_shutdown_requeues(ray_instance, tmp_path: Path) -> None:
    ray = ray_instance
    shared = tmp_path / "shared"
    config = JobsConfig(dir=str(tmp_path / "ray"), sandbox=Sandbox(timeout_s=3.0))
    m = JobManager(config, ray=ray_jobs(shared))
    data = m.upload(dataset_chunks())
    m.start()
    try:
        job = m.submit(sweep_spec(data.id, [0.0, 0.5], [32, 8]))
        last = list(m.watch(job.id))[-1]
        assert last.state == FAILED and "jobs.sandbox.timeout_s" in last.message, last
        assert all_cpus_free(ray, 60), ray.available_resources()
        config.sandbox.timeout_s = 0  # no limit: the next job is still running when the daemon stops
        job = m.submit(sweep_spec(data.id, [0.0, 0.5], [32, 8]))
        deadline = time.monotonic() + 60
        while m.get(job.id).state != RUNNING or ray.available_resources().get("CPU", 0) == CPUS:
            assert time.monotonic() < deadline, "the job never started on Ray"
            time.sleep(0.1)
    finally:
        m.close()
    assert all_cpus_free(ray, 60), ray.available_resources()
    again = JobManager(JobsConfig(dir=str(tmp_path / "ray")), ray=ray_jobs(shared))
    try:
        assert again.get(job.id).state == QUEUED and "shut down" in again.get(job.id).message
    finally:
        again.store.close()


DRIVER = """
import sys, time
from pathlib import Path
import ray
from tests.test_ray_jobs import dataset_chunks, ray_jobs, sweep_spec
from cloud_node.config import JobsConfig
from cloud_node.jobs import JobManager
from cloud_node.jobs.ray_tasks import RayJobs
root, shared, address = sys.argv[1:4]
m = JobManager(JobsConfig(dir=root), ray=RayJobs(shared, ray_jobs(Path(shared)).resources, address=address))
job = m.submit(sweep_spec(m.upload(dataset_chunks()).id, [0.0, 0.2, 0.4, 0.6], [32, 8, 4]))
m.start()
while not ray.is_initialized():  # RayJobs joins the cluster itself, with the first job
    time.sleep(0.1)
while ray.available_resources().get("CPU", 0) > 0:
    time.sleep(0.1)
print(job.id, flush=True)
time.sleep(600)
"""


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_daemon_killed_under_a_ray_job_leaves_no_task_and_the_job_is_requeued(ray_instance, tmp_path: Path) -> None:
    ray = ray_instance
    root, shared = tmp_path / "ray", tmp_path / "shared"
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(root), str(shared), address], stdout=subprocess.PIPE, text=True
    )
    try:
        job_id = proc.stdout.readline().strip()  # its sweep's points hold every CPU
        assert job_id, "the driver never got its job running"
    finally:
        proc.kill()  # SIGKILL: no clean shutdown, as in a crash
        proc.wait()
    assert all_cpus_free(ray, 60), ray.available_resources()  # Ray ended the dead driver's tasks
    assert no_job_tasks(60), ray_processes()  # and their workers
    m = JobManager(JobsConfig(dir=str(root)), ray=ray_jobs(shared))
    try:
        job = m.get(job_id)
        assert job.state == QUEUED and "re-queued" in job.message, job
        assert not list(shared.glob("*/work/*"))
    finally:
        m.store.close()


def ray_processes() -> dict[int, tuple[int, str, str]]:
    """Every process Ray titles ``ray::<what it runs>``: pid -> (parent pid, title, the Ray node its parent
    runs: the raylet's ``--node_id``, or "" for another parent), for :func:`job_task_pids` and messages."""
    found: dict[int, tuple[int, str, str]] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes()
            if title.startswith(b"ray::"):
                stat = (cmdline.parent / "stat").read_text()  # "pid (comm) state ppid ..."
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                args = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                node = next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), "")
                found[int(cmdline.parent.name)] = (ppid, title.split(b"\0")[0].decode(errors="replace"), node)
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile
    return found


def job_task_pids(node_id: str = "") -> list[int]:
    """Processes running a job's Ray task (Ray titles its workers ``ray::<function>``); this module's own.

    ``node_id``: only the workers of that Ray node (their parent is its raylet), not those of another Ray
    instance on this machine. A process the task starts carries the title from its fork until its exec, so
    one whose parent has the title too is not counted."""
    tasks = {
        pid: ppid
        for pid, (ppid, title, node) in ray_processes().items()
        if title == "ray::run_job_task" and node_id in ("", node)
    }
    return [pid for pid, ppid in tasks.items() if ppid not in tasks]


def no_job_tasks(within_s: float) -> bool:
    """Whether no process runs a job's Ray task any more (a task of a dead owner keeps its title until Ray
    has killed its worker, which lags the freed CPUs), in time."""
    return eventually(lambda: not job_task_pids(), within_s, 0.1)


@pytest.mark.ray
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_ray_job_whose_worker_dies_is_requeued_and_then_succeeds(ray_instance, tmp_path: Path) -> None:
    assert no_job_tasks(60), ray_processes()  # the worker killed below is this job's, not an earlier test's
    node = ray_instance.get_runtime_context().get_node_id()
    m = JobManager(JobsConfig(dir=str(tmp_path / "ray"), max_attempts=2), ray=ray_jobs(tmp_path / "shared"))
    data = m.upload(dataset_chunks())
    job = m.submit(sweep_spec(data.id, [0.0], [32]))
    m.start()
    try:
        deadline = time.monotonic() + 120
        while not job_task_pids(node):
            assert time.monotonic() < deadline, "no Ray worker ever ran the job"
            time.sleep(0.1)
        (pid,) = job_task_pids(node)
        at_kill = (m.get(job.id), ray_processes())
        os.kill(pid, signal.SIGKILL)  # as if its node went away
        seen = list(m.watch(job.id))
        # Re-queued (and at once claimed again: the note stays), then the second attempt succeeds.
        notes = [j.message for j in seen if j.message.startswith("re-queued: the Ray task's worker or node died")]
        assert notes and "WorkerCrashedError" in notes[0], (pid, at_kill, [(j.state, j.message[:80]) for j in seen])
        assert seen[-1].state == SUCCEEDED and m.get(job.id).attempts == 2, seen[-1]
    finally:
        m.close()


def test_code_uploads_are_refused_on_the_ray_path(tmp_path: Path) -> None:
    """No sandbox in a Ray task, so no TorchScript/.pt2 there, whatever jobs.allow_code_uploads says."""
    from cloud_node.jobs.ray_tasks import run_job_task

    outcome = json.loads(run_job_task({"workdir": str(tmp_path), "code": True}))
    assert outcome[0] == "error" and "jobs.allow_code_uploads" in outcome[1] and "not sandboxed" in outcome[1]


def test_a_restart_requeues_a_job_that_was_running_on_ray(tmp_path: Path) -> None:
    """No Ray needed: the manager's recovery is the same whichever executor ran the job."""
    shared = tmp_path / "shared"
    m = JobManager(JobsConfig(dir=str(tmp_path / "ray"), max_attempts=2), ray=ray_jobs(shared))
    job = m.submit(sweep_spec("", [0.0], [32]))
    assert m.store.claim_next().id == job.id  # RUNNING ... and the daemon dies
    leftover = m._work_dir / job.id / "out"
    leftover.mkdir(parents=True)
    m.store.close()
    m = JobManager(JobsConfig(dir=str(tmp_path / "ray"), max_attempts=2), ray=ray_jobs(shared))
    try:
        assert m.get(job.id).state == QUEUED and "re-queued" in m.get(job.id).message
        assert not leftover.exists()
        assert m.store.artifacts_dir.is_relative_to(shared)
    finally:
        m.store.close()


def test_two_job_stores_share_one_artifact_dir_without_touching_each_other(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a = JobManager(JobsConfig(dir=str(tmp_path / "a")), ray=ray_jobs(shared))
    b = JobManager(JobsConfig(dir=str(tmp_path / "b")), ray=ray_jobs(shared))
    try:
        assert a.store.artifacts_dir != b.store.artifacts_dir
        (a.store.artifacts_dir / "job-of-a").mkdir()
        b.store.reconcile()  # b's start-up clean-up does not see a's folders
        assert (a.store.artifacts_dir / "job-of-a").is_dir()
    finally:
        a.store.close()
        b.store.close()


def test_ray_jobs_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="artifact_dir"):
        RayJobs("", RayResources())
    with pytest.raises(ValueError, match="job_num_cpus"):
        RayJobs("/tmp/x", RayResources(num_cpus=0))
    with pytest.raises(ValueError, match="job_memory_mb"):
        RayJobs("/tmp/x", RayResources(memory_bytes=-1 << 20))


def test_the_job_manager_does_not_import_ray() -> None:
    """Without Ray jobs configured, nothing imports Ray: a machine without it runs jobs as before."""
    code = "import sys, cloud_node.jobs.manager, cloud_node.jobs.engines, cloud_node.jobs.ray_tasks; "
    code += "sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_cloud_yaml_ray_jobs_section_configures_the_jobs(tmp_path: Path) -> None:
    from cloud_node.config import CloudConfig
    from cloud_node.jobs.ray_tasks import ray_jobs_for
    from runtime.settings import SettingsError

    jobs = {"dir": str(tmp_path / "jobs")}
    ray_section = {
        "address": "local",
        "local_num_cpus": 2,
        "jobs": {"jobs_enabled": True, "job_num_cpus": 0.5, "job_memory_mb": 300, "artifact_dir": str(tmp_path)},
    }
    config = CloudConfig.from_dict({"jobs": jobs, "ray": ray_section})
    made = ray_jobs_for(config.ray, config.jobs.dir)
    assert made is not None and made.resources == RayResources(num_cpus=0.5, memory_bytes=300 << 20)
    assert made.artifact_dir == tmp_path and made.address == "local" and made.init_options["num_cpus"] == 2
    assert ray_jobs_for(CloudConfig.from_dict({"jobs": jobs}).ray, jobs["dir"]) is None  # off by default
    ray_section["address"] = ""
    with pytest.raises(SettingsError, match="ray.address"):
        ray_jobs_for(CloudConfig.from_dict({"jobs": jobs, "ray": ray_section}).ray, jobs["dir"])


def test_the_daemon_gives_its_job_manager_the_ray_jobs_cloud_yaml_asks_for(tmp_path: Path) -> None:
    from cloud_node.config import CloudConfig
    from cloud_node.jobs import CompressionServicer
    from cloud_node.main import load_services

    ray_section = {"address": "auto", "jobs": {"jobs_enabled": True, "artifact_dir": str(tmp_path / "shared")}}
    config = CloudConfig.from_dict({"jobs": {"dir": str(tmp_path / "jobs")}, "ray": ray_section})
    (jobs,) = [s.servicer for s in load_services(config) if isinstance(s.servicer, CompressionServicer)]
    try:
        assert isinstance(jobs.manager.ray, RayJobs) and jobs.manager.ray.address == "auto"
        assert jobs.manager.store.artifacts_dir.is_relative_to(tmp_path / "shared")
    finally:
        jobs.manager.close()
