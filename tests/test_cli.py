"""The ``cleave`` command as a user meets it: start-up imports, help texts, output forms, errors
that say what to do, ``cleave wait``, and daemons that listen before their models are loaded.

Timings are not asserted here (benchmarks/startup.py measures them); what makes them fast is:
which modules a command imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave_cli import compress_cmd
from cleave_cli.client import EdgeClient
from cleave_cli.errors import explain_rpc
from cleave_cli.launch import DaemonProcess, cloud_process, edge_process, free_port
from cleave_cli.main import STAGES, build_parser, main
from cleave_cli.output import infer_table, input_names, message_dict, status_table
from cleave_cli.wait import NotServing
from edge_node.autoplan import FIRST_PLAN
from edge_node.cloud_link import CloudLink
from edge_node.config import Reconnect
from edge_node.link import LinkMonitor
from edge_node.runtime import EdgeRuntime
from partitioner.loaded import LoadedModel
from partitioner.models import ModelSpec
from partitioner.placement import Placement
from protos.cleave.v1 import compression_pb2, compression_pb2_grpc, edge_pb2, tensor_pb2
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from runtime.serving import open_channel
from tests.support import ROOT

pytestmark = [pytest.mark.integration]

MODEL = {"name": "tiny", "source": "tests.support.factories:tiny_cnn", "input_shape": [1, 3, 16, 16]}
CUT = 3
HEAVY = ("torch", "torchvision", "grpc", "numpy", "google.protobuf")


@pytest.fixture(autouse=True)
def _no_cleave_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads CLEAVE_* variables: a developer's own settings must not leak into these tests."""
    for name in [n for n in os.environ if n.startswith("CLEAVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cloud(home: Path) -> Iterator[DaemonProcess]:
    """A cloud without a job store: its Compression service is off."""
    (home / "cloud.yaml").write_text(yaml.safe_dump({"models": [MODEL], "torch_threads": 1}))
    proc = cloud_process(home / "cloud.yaml", free_port(), home / "cloud.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def edge(home: Path, cloud: DaemonProcess) -> Iterator[DaemonProcess]:
    config = {"model": MODEL, "torch_threads": 1, "plan": {"cut": str(CUT), "encoding": "int8"}}
    (home / "edge.yaml").write_text(yaml.safe_dump(config))
    proc = edge_process(home / "edge.yaml", free_port(), cloud.port, home / "edge.log").start()
    yield proc
    proc.stop()


def run_cli(*args: str, stdout: int | None = subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    """``cleave ARGS`` in a fresh interpreter, as the console script runs it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cleave_cli.main import main; sys.exit(main())", *args],
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


# -- start-up: what each path imports ------------------------------------------------------------------


def test_help_imports_neither_torch_nor_grpc() -> None:
    # Every parser is built for `cleave --help`; each subcommand's --help builds them too.
    commands = [None, *build_parser()._subparsers._group_actions[0].choices]
    check = (
        "import sys\n"
        "from cleave_cli.main import main\n"
        f"for command in {commands!r}:\n"
        "    try:\n"
        "        main([command, '--help'] if command else ['--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (command, exc.code)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_status_and_info_do_not_import_torch(edge: DaemonProcess, cloud: DaemonProcess) -> None:
    check = (
        "import sys\n"
        "from cleave_cli.main import main\n"
        f"assert main(['status', '--edge', {edge.address!r}]) == 0\n"
        f"assert main(['info', '--cloud', {cloud.address!r}]) == 0\n"
        f"assert main(['wait', '--cloud', {cloud.address!r}]) == 0\n"
        "print('torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"


def test_infer_on_an_image_file_imports_no_torch(edge: DaemonProcess, tmp_path: Path) -> None:
    """``cleave infer photo.png --labels FILE``: numpy preprocessing and codec, and ``--labels imagenet``'s
    names read from torchvision's files without importing it; the answer is the model's own top-1 on that
    input. (The tiny model has 4 classes: ImageNet's 1000 names do not fit it, and are refused.)"""
    from PIL import Image

    from cleave_cli.labels import imagenet_categories
    from partitioner.imagefiles import load_array

    ramp = np.linspace(0, 255, 96 * 80, dtype=np.float32).reshape(96, 80)
    pixels = np.stack([ramp, ramp[::-1], 255 - ramp], axis=-1)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    names = ["north", "east", "south", "west"]
    (tmp_path / "labels.txt").write_text("\n".join(names))
    check = (
        "import sys, json\n"
        "from cleave_cli.labels import load_labels\n"
        "from cleave_cli.main import main\n"
        f"assert main(['infer', {str(path)!r}, '--edge', {edge.address!r}, '--json', '--labels', "
        f"{str(tmp_path / 'labels.txt')!r}]) == 0\n"
        "assert len(load_labels('imagenet')) == 1000\n"
        "print('torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    client = EdgeClient(edge.address)
    client.pin("cloud", "fp32")  # exact: the reply is the model's own output on that input
    try:
        done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        client.pin(str(CUT), "int8")
    assert done.returncode == 0, done.stderr
    *out, modules = done.stdout.strip().splitlines()
    assert modules == "False False"
    (record,) = json.loads("\n".join(out))
    model = LoadedModel.load(ModelSpec.from_dict(MODEL))
    with torch.inference_mode():
        logits = model.module(torch.from_numpy(load_array(path, model.input_shape)))
    best = int(logits.argmax())
    assert record["top"][0]["class"] == best, record
    assert record["top"][0]["label"] == names[best]
    from torchvision.models import ResNet18_Weights

    assert imagenet_categories() == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def test_daemon_modules_import_no_torch_before_listening() -> None:
    # What runs before the port is bound: the command modules and their config parsing.
    check = (
        "import sys\n"
        "import cloud_node.main, edge_node.main\n"
        "cloud_node.main.build_config(cloud_node.main.parse_args(['--model', 'resnet18']))\n"
        "edge_node.main.build_config(edge_node.main.parse_args(['--model', 'resnet18', '--encoding', 'int4']))\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- help texts ------------------------------------------------------------------------------------------


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    yield "cleave", parser
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        yield f"cleave {name}", sub


def test_every_option_has_a_description_and_shows_its_default() -> None:
    for prog, parser in _parsers():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{prog} {action.option_strings or action.dest}: no description"
            default = action.default
            if action.option_strings and default not in (None, False, [], argparse.SUPPRESS):
                shown = parser._get_formatter()._get_help_string(action) % {"default": default}
                forms = {str(default), f"{default:g}" if isinstance(default, float) else str(default)}
                assert any(f in shown for f in forms), f"{prog} {action.option_strings}: default {default!r} not shown"
        assert "cleave" in text


def test_bits_help_and_validation_agree(capsys: pytest.CaptureFixture) -> None:
    from edge_node.main import parse_args

    for bits in (2, 3, 4, 5, 6, 8, 16, 32):
        assert parse_args(["--bits", str(bits)]).bits == bits
    with pytest.raises(SystemExit):
        parse_args(["--bits", "7"])
    err = capsys.readouterr().err
    assert "--bits" in err and "invalid choice: 7" in err and "EncodingSpec" not in err
    with pytest.raises(SystemExit):
        main(["compress", "--model", "resnet18", "--engine", "quantize", "--bits", "7"])
    err = capsys.readouterr().err
    assert "--bits" in err and "invalid choice: 7" in err
    assert "2,3,4,5,6,8" in build_parser()._subparsers._group_actions[0].choices["compress"].format_help()


# -- output ----------------------------------------------------------------------------------------------


def sample_status() -> edge_pb2.EdgeStatus:
    status = edge_pb2.EdgeStatus(
        model="resnet18",
        fingerprint="ab" * 32,
        input_shape=[1, 3, 224, 224],
        cloud="10.0.0.2:50051",
        cloud_reachable=True,
        mean_latency_ms=12.5,
        link=edge_pb2.LinkStatus(rtt_ms=3.25, up_mbps=48.0, down_mbps=96.0, samples=7),
        plan=edge_pb2.Plan(
            placement=edge_pb2.SPLIT,
            cut_index=34,
            cut_name="layer2_1_relu_1",
            encoding=tensor_pb2.TensorEncoding(
                encoding=tensor_pb2.AFFINE, bits=4, per_channel=True, codec=tensor_pb2.ZSTD
            ),
            predicted_ms=14.0,
            predicted_bytes=25_000,
            reason="planner",
        ),
    )
    status.counters.requests = 3_000_000_000_000  # beyond int32, and MessageToDict would write "3000000000000"
    status.counters.split = 5
    status.plan.weight_bits["layer1.0.conv1"] = 8
    return status


def test_json_keeps_numbers_as_numbers_and_every_field() -> None:
    data = json.loads(json.dumps(message_dict(sample_status())))
    assert data["counters"]["requests"] == 3_000_000_000_000
    assert data["counters"]["split"] == 5 and data["counters"]["fallback"] == 0  # defaults are there too
    assert data["input_shape"] == [1, 3, 224, 224]
    assert data["plan"]["predicted_bytes"] == 25_000
    assert data["plan"]["weight_bits"] == {"layer1.0.conv1": 8}
    assert data["plan"]["placement"] == "SPLIT"


def test_status_table_reads_at_a_glance() -> None:
    table = status_table(sample_status(), "127.0.0.1:50052")
    assert "SPLIT at layer2_1_relu_1 (cut #34), features int4c+zstd" in table
    assert "RTT 3.25 ms, up 48.0 Mbit/s, down 96.0 Mbit/s" in table
    assert "3000000000000 total: 5 split" in table
    assert "10.0.0.2:50051  connected" in table
    assert not table.lstrip().startswith("{")


def test_status_table_says_which_link_direction_is_unmeasured() -> None:
    # A pinned split edge whose replies are small never measures its downlink: the table read
    # "down 0.0 Mbit/s", a dead link, while 16 KB had come down.
    status = sample_status()
    status.link.down_mbps = 0.0
    line = next(row for row in status_table(status, "127.0.0.1:50052").splitlines() if row.startswith("link"))
    assert "up 48.0 Mbit/s, down not measured yet" in line and "0.0 Mbit/s" not in line


def test_status_table_while_the_first_plan_is_made() -> None:
    # The planner works from the start; the table said "not running: planning has not started" for the
    # 90 s the pretrained Lite0's first plan took.
    status = sample_status()
    status.auto_plan, status.planner_error = True, FIRST_PLAN
    line = next(row for row in status_table(status, "127.0.0.1:50052").splitlines() if row.startswith("planner"))
    assert line.split(None, 1)[1].startswith("automatic (first plan in progress: profiles")
    assert "not running" not in line and "not started" not in line


def _infer_record(name: str, label: str = "") -> dict:
    stages = {key: 1.0 for key, _ in STAGES}
    top = {"class": 285, "score": 9.0, **({"label": label} if label else {})}
    return {"input": name, "placement": "EDGE_ONLY", "top": [top], "timing_ms": stages, "bytes_up": 0, "note": ""}


def test_infer_table_names_photos_by_file_name() -> None:
    # Photos passed by absolute path (README's tour): the table showed the last 14 characters, "ta/chelsea.png".
    site = "/usr/lib/python3.11/site-packages/skimage/data"
    rows = [_infer_record(f"{site}/chelsea.png", "Egyptian cat"), _infer_record(f"{site}/coffee.png")]
    lines = infer_table(rows, STAGES).splitlines()
    assert lines[1].startswith("chelsea.png ") and lines[1].endswith("  Egyptian cat")
    assert lines[2].startswith("coffee.png ")
    assert [line.index("EDGE_ONLY") for line in lines[1:]] == [lines[0].index("where")] * 2  # columns line up
    # Base names that do not tell inputs apart: the paths; a long one keeps its end after "...".
    same = [_infer_record("a/x.png"), _infer_record("b" * 40 + "/x.png")]
    assert input_names([r["input"] for r in same]) == ["a/x.png", "..." + ("b" * 40 + "/x.png")[-29:]]


def test_infer_checks_labels_before_it_calls_the_edge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A wrong --labels used to surface after every input was made and sent (16 s with --random under load).
    port = free_port()  # nothing listens: an edge call would fail UNAVAILABLE instead
    missing = tmp_path / "labels.txt"
    assert main(["infer", "--edge", f"127.0.0.1:{port}", "--labels", str(missing), "--random", "1"]) == 1
    err = capsys.readouterr().err
    assert "--labels: cannot read" in err and "UNAVAILABLE" not in err


def test_infer_refuses_labels_that_do_not_match_the_outputs(
    edge: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A 1001-line list (TensorFlow's ImageNet labels: "background" first) named every class one off, silently.
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["background", "a", "b", "c", "d"]))  # the tiny model has 4 classes
    assert main(["infer", "--edge", edge.address, "--labels", str(labels), "--random", "1"]) == 1
    err = capsys.readouterr().err
    assert f"cleave infer: --labels: {labels} names 5 classes; the model has 4 outputs" in err, err
    assert main(["infer", "--edge", edge.address, "--labels", "imagenet", "--random", "1"]) == 1
    assert "--labels: imagenet names 1000 classes; the model has 4 outputs" in capsys.readouterr().err


def test_labels_imagenet_without_torchvision_says_what_to_give_instead(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # On the torch-free edge the error said only that torchvision is missing: not what works there.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    assert main(["infer", "--edge", f"127.0.0.1:{free_port()}", "--labels", "imagenet", "--random", "1"]) == 1
    err = capsys.readouterr().err
    assert "torchvision, which is not installed" in err and "--labels FILE, one class name per line" in err


def test_infer_random_makes_each_input_as_it_is_sent(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # `--random 100000` made every input before the first request: 60 GB for Lite0's 224x224.
    from types import SimpleNamespace

    from cleave_cli.images import synthetic_images

    sent: list[np.ndarray] = []

    class Client:
        def __init__(self, *_args, **_kwargs) -> None:
            pass

        def status(self, timeout: float) -> SimpleNamespace:
            return SimpleNamespace(input_shape=[1, 3, 8, 8])

        def infer(self, x: np.ndarray, timeout: float) -> None:
            sent.append(x)
            raise KeyboardInterrupt  # the user's Ctrl-C, during the first request

    monkeypatch.setattr("cleave_cli.client.EdgeClient", Client)
    assert main(["infer", "--edge", "127.0.0.1:1", "--random", str(10**9)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(sent) == 1 and np.array_equal(sent[0], synthetic_images(1, (1, 3, 8, 8)).numpy())


def test_status_against_a_daemon_table_and_json(edge: DaemonProcess, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--edge", edge.address]) == 0
    table = capsys.readouterr().out
    assert "SPLIT at" in table
    assert "tiny" in table and "connected" in table
    assert main(["status", "--edge", edge.address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny" and data["input_shape"] == [1, 3, 16, 16]
    assert isinstance(data["counters"]["requests"], int) and isinstance(data["counters"]["reconnects"], int)


def test_closed_pipe_ends_quietly(cloud: DaemonProcess) -> None:
    # `cleave info | head -1` once head has exited: every write fails with EPIPE.
    for args in (["info", "--cloud", cloud.address], ["--help"], ["jobs", "--help"]):
        read, write = os.pipe()
        os.close(read)
        try:
            done = run_cli(*args, stdout=write)
        finally:
            os.close(write)
        assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr
        # argparse drops a failed --help write itself; a command's output ends as SIGPIPE would end it.
        assert done.returncode == (0 if "--help" in args else 141), (args, done.stderr)


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("cleave_cli.main.cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "cleave info: interrupted"


def test_ctrl_c_in_compress_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    class Client:
        def __init__(self, *_args, **_kwargs) -> None:
            pass

        def submit(self, _spec: compression_pb2.JobSpec) -> compression_pb2.Job:
            return compression_pb2.Job(id="job-7f3a", engine="prune_cnn")

        def close(self) -> None:
            pass

    def follow(*_args, **_kwargs) -> compression_pb2.Job:
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_cmd, "CompressionClient", Client)
    monkeypatch.setattr(compress_cmd, "follow", follow)
    args = ["compress", "--cloud", "10.1.2.3:50051", "--model", "resnet18", "--ca", "/etc/ca.crt", "--out", "my dir"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "job job-7f3a goes on" in err
    assert "cleave jobs watch job-7f3a --cloud 10.1.2.3:50051 --ca /etc/ca.crt" in err
    assert "cleave jobs download job-7f3a --cloud 10.1.2.3:50051 --ca /etc/ca.crt --out 'my dir'" in err
    assert "Traceback" not in err


class _JobsClient:
    """A Compression client whose job reports one training step per update, as a bottleneck job does."""

    def __init__(self, steps: int) -> None:
        stage = "cut _avg_pooling, rate weight 0.1: step {}: KL 0.0123"
        self.jobs = [
            compression_pb2.Job(id="j1", state=compression_pb2.RUNNING, progress=i / steps, stage=stage.format(i))
            for i in range(steps)
        ]
        self.jobs.append(compression_pb2.Job(id="j1", state=compression_pb2.SUCCEEDED, progress=1.0, stage="done"))

    def get(self, _job_id: str) -> compression_pb2.Job:
        return self.jobs[0]

    def watch(self, _job_id: str) -> Iterator[compression_pb2.Job]:
        yield from self.jobs


@pytest.mark.parametrize("flag", ["--upload", "--dataset"])
def test_compress_names_a_missing_upload_or_dataset(tmp_path: Path, flag: str, capsys) -> None:
    # A missing --upload printed "cleave compress: [Errno 2] No such file or directory: '...'", no flag named.
    missing = tmp_path / "weights.safetensors"
    model = ["--upload", str(missing), "--arch", "resnet18"] if flag == "--upload" else ["--model", "resnet18"]
    extra = ["--dataset", str(tmp_path / "data.npz")] if flag == "--dataset" else []
    cloud = f"127.0.0.1:{free_port()}"  # nothing listens: a call to the cloud would fail UNAVAILABLE instead
    assert main(["compress", "--cloud", cloud, *model, *extra, "--engine", "quantize"]) == 2
    err = capsys.readouterr().err
    assert f"cleave compress: {flag} {tmp_path}/" in err and "no such file" in err and "Errno" not in err


def test_compress_progress_in_a_log_prints_whole_lines_per_tenth() -> None:
    # Piped or logged, the bar wrote one carriage-return frame per training step (hundreds, one
    # "line"), each cut at 100 characters: the stage ended "KL 0." mid-number.
    import io

    log = io.StringIO()
    job = compress_cmd.follow(_JobsClient(steps=200), "j1", stream=log)
    lines = log.getvalue().splitlines()
    assert job.state == compression_pb2.SUCCEEDED and "\r" not in log.getvalue()
    assert 10 <= len(lines) <= 12  # one per tenth of progress, plus the final state
    assert all(line.split()[-1] == "0.0123" for line in lines[:-1])  # the stage whole
    assert "SUCCEEDED" in lines[-1]


def test_compress_progress_on_a_terminal_fits_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 100-character line on an 80-column terminal wraps, and each rewrite then starts a new line.
    import io
    import os

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(compress_cmd.shutil, "get_terminal_size", lambda *_: os.terminal_size((80, 24)))
    term = Terminal()
    compress_cmd.follow(_JobsClient(steps=5), "j1", stream=term)
    frames = term.getvalue().split("\r\033[K")[1:]
    assert len(frames) == 6 and all(len(frame.rstrip("\n")) <= 79 for frame in frames)
    assert frames[-1].rstrip("\n").endswith("SUCCEEDED done")


# -- errors that say what to do ---------------------------------------------------------------------------


def test_compression_off_says_how_to_turn_it_on(cloud: DaemonProcess, capsys: pytest.CaptureFixture) -> None:
    with open_channel(cloud.address) as channel, pytest.raises(grpc.RpcError) as err:
        compression_pb2_grpc.CompressionStub(channel).ListJobs(compression_pb2.ListJobsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Compression service is off" in err.value.details() and "--jobs-dir" in err.value.details()
    assert main(["jobs", "list", "--cloud", cloud.address]) == 1
    message = capsys.readouterr().err
    assert "Compression service is off" in message and "--jobs-dir" in message and "Method not found" not in message


def test_an_input_shape_the_model_cannot_take_is_one_line_naming_it(capsys: pytest.CaptureFixture) -> None:
    # `--input-shape 1,3,64` for resnet18 stopped cleave plan/info, cleave-cloud and cleave-edge with two
    # tracebacks (the trace's error was no ValueError) and torch's "While executing ... tlparse" lines.
    assert main(["info", "--cuts", "--model", "resnet18", "--input-shape", "1,3,64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cleave info: model 'resnet18' (input shape 1,3,64): ") and "at node 'conv1'" in err
    assert "Traceback" not in err and "While executing" not in err and len(err.strip().splitlines()) == 1


def test_method_not_found_from_an_older_cloud_is_explained() -> None:
    args = argparse.Namespace(command="compress", cloud="10.0.0.1:50051")
    message = explain_rpc("UNIMPLEMENTED", "Method not found!", args)
    assert "Compression service is off on 10.0.0.1:50051" in message and "--jobs-dir" in message


def test_nothing_listening_says_so() -> None:
    args = argparse.Namespace(command="info", cloud="127.0.0.1:1")
    details = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    message = explain_rpc("UNAVAILABLE", details, args)
    assert "nothing answers on 127.0.0.1:1" in message and "cleave wait --cloud 127.0.0.1:1" in message


def test_a_port_that_answers_http1_is_not_called_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The cloud's --http-port given where its gRPC port belongs: "nothing answers on ...: is the daemon
    # running?" for status/infer/jobs, and `cleave wait` polled it until its timeout.
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["status", "--edge", target]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cleave status: UNAVAILABLE: {target} answers, but not in gRPC (HTTP/1?): "), err
        assert "--http-port" in err
        started = time.monotonic()
        assert main(["wait", "--cloud", target, "--timeout", "30"]) == 1
        assert time.monotonic() - started < 10
        assert capsys.readouterr().err.startswith(f"cleave wait: {target} answers, but not in gRPC")
    finally:
        server.shutdown()
        server.server_close()


def test_edge_whose_model_the_cloud_does_not_serve_says_so(cloud: DaemonProcess, caplog) -> None:
    model = LoadedModel.load(ModelSpec.from_dict({**MODEL, "name": "other"}))
    link = CloudLink(cloud.address, model, LinkMonitor(), Reconnect(initial_s=5.0, max_s=5.0), 1 << 20, 64 << 20)
    runtime = EdgeRuntime(model, link.start(), request_timeout_s=5.0)
    try:
        with caplog.at_level(logging.WARNING):
            runtime.pin(Placement.SPLIT, CUT, runtime.plan.spec, reason="pinned by test")
            outcome = runtime.infer([torch.zeros(1, 3, 16, 16)])
        assert outcome.placement == Placement.LOCAL_FALLBACK
        assert outcome.note.startswith("cloud refused the session: model 'other' is not served here")
        assert "unreachable" not in outcome.note
        logged = caplog.text
        assert "refused the session: NOT_FOUND" in logged
        assert "falling back to the tail here" in logged and "pinned by test" in logged
    finally:
        link.close()


# -- cleave wait, and daemons that listen while they load -----------------------------------------------------


def test_wait_fails_on_a_closed_port_with_the_reason(capsys: pytest.CaptureFixture) -> None:
    port = free_port()  # nothing listens there
    assert main(["wait", "--cloud", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} not SERVING after 1 s" in err and "UNAVAILABLE" in err


def test_wait_succeeds_against_a_serving_daemon(cloud: DaemonProcess, edge: DaemonProcess) -> None:
    assert main(["wait", "--cloud", cloud.address, "--quiet"]) == 0
    assert main(["wait", "--edge", edge.address, "--timeout", "30"]) == 0


def test_wait_on_the_wrong_daemon_fails_at_once(
    cloud: DaemonProcess, edge: DaemonProcess, capsys: pytest.CaptureFixture
) -> None:
    # `cleave wait --edge` on the cloud's port said SERVING: the next call then failed UNIMPLEMENTED.
    started = time.monotonic()
    assert main(["wait", "--edge", cloud.address, "--timeout", "30"]) == 1
    assert main(["wait", "--cloud", edge.address, "--timeout", "30"]) == 1
    assert time.monotonic() - started < 10  # not the 30 s timeout: the answer cannot change
    err = capsys.readouterr().err
    assert f"{cloud.address} does not serve cleave.v1.Edge: is it the right daemon" in err
    assert f"{edge.address} does not serve cleave.v1.SplitInference" in err


def start_gated_cloud(home: Path, name: str) -> tuple[subprocess.Popen, str, Path]:
    """A cloud whose model loads once the returned gate file exists; returns when it first answers health."""
    gate = home / f"{name}.gate"
    model = {"name": name, "source": "tests.support.factories:gated_tiny_cnn", "input_shape": [1, 3, 16, 16]}
    (home / f"{name}.yaml").write_text(yaml.safe_dump({"models": [model], "torch_threads": 1}))
    port = free_port()
    env = {**os.environ, "CLEAVE_TEST_LOAD_GATE": str(gate)}
    with open(home / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_node.main", "--config", str(home / f"{name}.yaml"), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    with open_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (home / f"{name}.log").read_text()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                break
            except grpc.RpcError:
                time.sleep(0.05)
    # The first answer: the daemon listens while its model waits for the gate.
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    return proc, address, gate


def test_daemon_listens_not_serving_until_its_models_load(home: Path, capsys: pytest.CaptureFixture) -> None:
    proc, address, gate = start_gated_cloud(home, "gated")
    try:
        with open_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                si_grpc.SplitInferenceStub(channel).GetInfo(si_pb2.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in err.value.details()
            # The gate holds the load: any timeout ends NOT_SERVING. The daemon already answered a health check
            # above, so 3 s is long enough for a busy machine to answer again (each wait used to take 10 s).
            assert main(["wait", "--cloud", address, "--timeout", "3"]) == 1
            assert "NOT_SERVING" in capsys.readouterr().err
            client = EdgeClient(address)  # an app's wait: health, not just an open port
            with pytest.raises(NotServing, match="NOT_SERVING"):
                client.wait_ready(timeout=3)

            gate.touch()
            assert main(["wait", "--cloud", address, "--timeout", "120"]) == 0
            client.wait_ready(timeout=10)
            client.close()
            info = si_grpc.SplitInferenceStub(channel).GetInfo(si_pb2.GetInfoRequest(), timeout=10)
            assert info.models[0].name == "gated"
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_stop_signal_while_loading_stops_the_daemon(home: Path) -> None:
    # The gate never opens: without abandoning the load, the daemon would wait for it for minutes.
    proc, _, _ = start_gated_cloud(home, "stuck")
    proc.terminate()
    try:
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert "Traceback" not in (home / "stuck.log").read_text()


def test_daemon_that_fails_to_load_exits_with_the_reason(home: Path) -> None:
    model = {"name": "broken", "source": "tests.support.factories:not_a_module", "input_shape": [1, 3, 16, 16]}
    (home / "broken.yaml").write_text(yaml.safe_dump({"models": [model]}))
    done = subprocess.run(
        [sys.executable, "-m", "cloud_node.main", "--config", str(home / "broken.yaml"), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "cleave-cloud:" in done.stderr and "broken" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--bandwidth", "20", "--calibration", "EMPTY"], "calibration"),
        ([], "give --cloud HOST:PORT, or --bandwidth"),
    ],
)
def test_plan_checks_its_arguments_before_profiling(
    extra: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A directory without images, or neither --cloud nor --bandwidth, failed only after the profile (a minute
    # on a busy machine).
    import partitioner.profile

    def no_profile(*_a, **_k):
        raise AssertionError("profiled before checking the arguments")

    monkeypatch.setattr(partitioner.profile, "cached_profile", no_profile)
    extra = [str(tmp_path) if a == "EMPTY" else a for a in extra]
    assert main(["plan", "--model", "resnet18", "--input-shape", "1,3,64,64", *extra]) == 1
    err = capsys.readouterr().err
    assert expected in err and "profiled before" not in err and "Traceback" not in err
