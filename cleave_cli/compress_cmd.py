"""``cleave compress`` and ``cleave jobs``: the Compression service from the command line.

cleave compress --cloud 127.0.0.1:50051 --model resnet18 --ratio 0.5 --out pruned/
cleave compress --cloud ... --upload model.safetensors --arch resnet18 --engine quantize --bits 4
cleave jobs list | show ID | cancel ID | download ID [--artifact plan.json] [--out DIR]

Every download resumes from a partial ``*.part`` file and is checked against the artifact's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .lazy import LazyModule
from .security_args import add_security_args, channel_security

if TYPE_CHECKING:
    from runtime.security import ClientTLS

# Imported when a command runs, not when the parsers are built.
pb = LazyModule("protos.cleave.v1.compression_pb2")
pb_grpc = LazyModule("protos.cleave.v1.compression_pb2_grpc")

UPLOAD_CHUNK = 1 << 20
QUANTIZE_BITS = [2, 3, 4, 5, 6, 8]  # the weight bit-widths the quantize engine accepts
FORMATS = {  # suffix: the name of its UploadFormat value
    ".ts": "TORCHSCRIPT",
    ".pt": "TORCHSCRIPT",
    ".torchscript": "TORCHSCRIPT",
    ".jit": "TORCHSCRIPT",
    ".pt2": "EXPORTED_PROGRAM",
    ".safetensors": "SAFETENSORS",
    ".npz": "DATASET_NPZ",
}


class VerificationError(OSError):
    """A downloaded file does not hash to the artifact's sha256."""


class CompressionClient:
    """A thin client: upload, submit, watch, download (resumable, verified)."""

    def __init__(self, target: str, *, tls: ClientTLS | None = None, token: str | None = None) -> None:
        from runtime.serving import open_channel

        self.channel = open_channel(target, tls=tls, token=token)
        self.stub = pb_grpc.CompressionStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def upload(self, path: Path, header: pb.UploadHeader, timeout: float | None = None) -> pb.UploadModelResponse:
        data = Path(path).read_bytes()
        header.total_bytes = header.total_bytes or len(data)
        header.sha256 = header.sha256 or hashlib.sha256(data).hexdigest()
        header.name = header.name or Path(path).name

        def chunks() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=header)
            for i in range(0, len(data), UPLOAD_CHUNK):
                yield pb.UploadChunk(data=data[i : i + UPLOAD_CHUNK])

        return self.stub.UploadModel(chunks(), timeout=timeout)

    def submit(self, spec: pb.JobSpec, timeout: float | None = 30.0) -> pb.Job:
        return self.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=timeout)

    def get(self, job_id: str, timeout: float | None = 30.0) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=timeout)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.Job]:
        return self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30.0)

    def list(self, states: list[int] | None = None, limit: int = 0) -> list[pb.Job]:
        return list(self.stub.ListJobs(pb.ListJobsRequest(states=states or [], limit=limit), timeout=30.0).jobs)

    def download(self, job_id: str, artifact: str, dest: Path, chunk_bytes: int = 0) -> str:
        """Fetch an artifact to ``dest``, resuming ``dest.part`` if present; returns the verified sha256."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        offset = part.stat().st_size if part.exists() else 0
        expected = ""
        request = pb.DownloadRequest(job_id=job_id, artifact=artifact, offset=offset, chunk_bytes=chunk_bytes)
        with open(part, "ab") as f:
            for chunk in self.stub.Download(request, timeout=600):
                if chunk.offset != f.tell():
                    raise VerificationError(f"{dest.name}: chunk at {chunk.offset}, expected {f.tell()}")
                f.write(chunk.data)
                expected = chunk.sha256
        digest = _sha256(part)
        if digest != expected:
            part.unlink()
            raise VerificationError(f"{dest.name}: sha256 {digest} does not match the server's {expected}")
        part.replace(dest)
        return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def progress_bar(job: pb.Job, width: int = 30) -> str:
    done = int(job.progress * width)
    state = pb.JobState.Name(job.state)
    return f"[{'#' * done}{'.' * (width - done)}] {job.progress * 100:5.1f}% {state:<9} {job.stage}"


def follow(client: CompressionClient, job_id: str, quiet: bool = False, stream: TextIO | None = None) -> pb.Job:
    """Watch a job to its end, showing its progress on ``stream`` (stderr).

    On a terminal one line is rewritten in place, cut to the terminal's width (a line wider than the
    terminal wraps, and each update then starts a new line). Elsewhere (a pipe, a log file) a line is
    printed, whole, when the state changes or the progress enters a new tenth: a bottleneck job sends
    an update per training step, and the log got one line of hundreds of carriage-return frames.
    """
    stream = stream or sys.stderr
    tty = stream.isatty()
    columns = shutil.get_terminal_size((101, 24)).columns - 1
    last: tuple[int, int] | None = None
    job = client.get(job_id)
    for job in client.watch(job_id):
        if quiet:
            continue
        if tty:
            stream.write("\r\033[K" + progress_bar(job)[:columns])
            stream.flush()
        elif (key := (job.state, int(job.progress * 10))) != last:
            last = key
            print(progress_bar(job), file=stream, flush=True)
    if not quiet and tty:
        print(file=stream, flush=True)
    return job


def download_all(client: CompressionClient, job: pb.Job, out: Path) -> list[tuple[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    return [(a.name, client.download(job.id, a.name, out / a.name)) for a in job.artifacts]


def not_a_directory(out: str | None) -> bool:
    """Whether ``--out`` names something that is there and is not a directory (the artifacts cannot go in)."""
    return bool(out) and Path(out).exists() and not Path(out).is_dir()


def _shape(text: str | None) -> list[int]:
    from runtime.settings import parse_shape

    return parse_shape(text) if text else []


def build_spec(args: argparse.Namespace, model_id: str = "", dataset_id: str = "") -> pb.JobSpec:
    ref = pb.ModelRef(input_shape=_shape(args.input_shape), seed=args.seed, num_classes=args.num_classes or 0)
    if model_id:
        ref.model_id = model_id
    elif args.transformer:
        ref.transformer = args.transformer
        ref.config_json = args.config or ""
    else:
        ref.torchvision = args.model
    spec = pb.JobSpec(
        engine=args.engine, model=ref, dataset_id=dataset_id, label=args.label or "", skip_evaluation=args.no_eval
    )
    spec.prune.CopyFrom(
        pb.PruneOptions(
            ratio=args.ratio,
            global_pruning=args.global_pruning,
            ignored_layers=args.ignore,
            round_to=args.round_to,
            importance=args.importance or "",
            head_ratio=args.head_ratio,
            ffn_ratio=args.ffn_ratio,
            prune_classifier=args.prune_classifier,
        )
    )
    for item in args.layer_ratio:
        name, _, value = item.partition("=")
        spec.prune.layer_ratios[name] = float(value)
    spec.quantize.CopyFrom(pb.QuantizeOptions(bits=args.bits, clip=args.clip or "", per_tensor=args.per_tensor))
    spec.sweep.CopyFrom(
        pb.SweepOptions(
            ratios=[float(r) for r in args.ratios.split(",")] if args.ratios else [],
            bits=[int(b) for b in args.bits_grid.split(",")] if args.bits_grid else [],
            parallelism=args.parallelism,
        )
    )
    if args.engine == "bottleneck":
        spec.bottleneck.CopyFrom(
            pb.BottleneckOptions(
                cuts=[c for c in (args.cuts or "").split(",") if c and c != "auto"],
                rate_weights=[float(w) for w in args.rate_weights.split(",")] if args.rate_weights else [],
                target_bytes=args.target_bytes,
                latent=args.latent,
                stride=args.stride,
                budget_s=args.budget,
                kind=args.kind or "",
                temperature=args.temperature,
                margin_weight=args.margin_weight,
                mixup=args.mixup,
                levels=[float(v) for v in args.levels.split(",")] if args.levels else [],
                dead_zone=args.dead_zone,
            )
        )
    return spec


def cmd_compress(args: argparse.Namespace) -> int:
    if not (args.model or args.upload or args.transformer):
        print("cleave compress: give --model, --transformer or --upload", file=sys.stderr)
        return 2
    for flag, value in (("--upload", args.upload), ("--dataset", args.dataset)):
        # Checked before the cloud is called: a missing file was a bare "[Errno 2] No such file ...".
        if value and not Path(value).is_file():
            why = "is a directory" if Path(value).is_dir() else "no such file"
            print(f"cleave compress: {flag} {value}: {why}", file=sys.stderr)
            return 2
    if not args.no_download and not_a_directory(args.out):  # found after the job ran, it cost the whole job
        print(f"cleave compress: --out {args.out}: exists and is not a directory", file=sys.stderr)
        return 2
    client = CompressionClient(args.cloud, **channel_security(args))
    try:
        model_id = dataset_id = ""
        if args.upload:
            path = Path(args.upload)
            fmt = getattr(pb, FORMATS.get(path.suffix.lower(), ""), None)
            if fmt is None:
                print(f"cleave compress: --upload {path}: unknown suffix (.ts, .pt2, .safetensors)", file=sys.stderr)
                return 2
            header = pb.UploadHeader(
                format=fmt,
                architecture=args.arch or "",
                config_json=args.config or "",
                input_shape=_shape(args.input_shape),
                num_classes=args.num_classes or 0,
            )
            reply = client.upload(path, header)
            model_id = reply.id
            print(f"uploaded {path} as {reply.id} ({reply.kind}, {reply.size_bytes} bytes)", file=sys.stderr)
        if args.dataset:
            path = Path(args.dataset)
            fmt = pb.DATASET_NPZ if path.suffix == ".npz" else pb.DATASET_SAFETENSORS
            dataset_id = client.upload(path, pb.UploadHeader(format=fmt)).id
        job = client.submit(build_spec(args, model_id, dataset_id))
        print(f"job {job.id}: engine {job.engine}", file=sys.stderr)
        if args.no_wait:
            print(job.id)
            return 0
        try:
            job = follow(client, job.id, quiet=args.json)
            if job.state != pb.SUCCEEDED:
                print(f"job {job.id} {pb.JobState.Name(job.state)}: {job.message}", file=sys.stderr)
                return 1
            files = download_all(client, job, Path(args.out or job.id)) if not args.no_download else []
        except KeyboardInterrupt:
            print("\n" + resume_hint(args, job.id), file=sys.stderr)
            return 130
        if args.json:
            from .output import message_dict

            print(json.dumps({"job": message_dict(job), "downloaded": dict(files)}, indent=2))
        else:
            for name, digest in files:
                print(f"{Path(args.out or job.id) / name}  sha256 {digest}  verified")
            print(job.report_json)
        warn_from_report(job)
        return 0
    finally:
        client.close()


def warn_from_report(job: pb.Job) -> None:
    """Print the report's ``warning`` (a job that succeeded without doing what was asked) on stderr."""
    try:
        warning = json.loads(job.report_json or "{}").get("warning")
    except (ValueError, AttributeError):
        return
    if warning:
        print(f"warning: job {job.id}: {warning}", file=sys.stderr)


def _connection_flags(args: argparse.Namespace) -> str:
    """The flags that reach the same cloud the same way (never ``--token``: it would be printed)."""
    words = ["--cloud", args.cloud]
    if getattr(args, "tls", False):
        words.append("--tls")
    for flag in ("ca", "cert", "key", "server_name", "token_file"):
        value = getattr(args, flag, None)
        if value:
            words += [f"--{flag.replace('_', '-')}", value]
    return " ".join(shlex.quote(w) for w in words)


def resume_hint(args: argparse.Namespace, job_id: str) -> str:
    """What to say when the user interrupts a compress that submitted ``job_id``: it goes on."""
    flags = _connection_flags(args)
    out = shlex.quote(args.out or job_id)
    return (
        f"interrupted: job {job_id} goes on in the cloud. To resume:\n"
        f"  cleave jobs watch {job_id} {flags}\n"
        f"  cleave jobs download {job_id} {flags} --out {out}\n"
        f"or stop it: cleave jobs cancel {job_id} {flags}"
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    client = CompressionClient(args.cloud, **channel_security(args))
    try:
        if args.action == "list":
            jobs = client.list(limit=args.limit)
            if args.json:
                from .output import message_dict

                print(json.dumps([message_dict(j) for j in jobs], indent=2))
                return 0
            print(f"{'id':<17} {'state':<10} {'engine':<18} {'progress':>8}  stage / message")
            for j in jobs:
                print(
                    f"{j.id:<17} {pb.JobState.Name(j.state):<10} {j.engine:<18} {j.progress * 100:7.1f}%  "
                    f"{j.message or j.stage}"
                )
            return 0
        if not args.job_id:
            print(f"cleave jobs {args.action}: give a job id", file=sys.stderr)
            return 2
        if args.action == "show":
            from .output import message_dict

            job = client.get(args.job_id)
            print(json.dumps(message_dict(job), indent=2))
        elif args.action == "cancel":
            job = client.cancel(args.job_id)
            print(f"job {job.id}: {pb.JobState.Name(job.state)}")
        elif args.action == "watch":
            job = follow(client, args.job_id)
            print(f"job {job.id}: {pb.JobState.Name(job.state)} {job.message}")
            warn_from_report(job)
        else:
            if not_a_directory(args.out):
                print(f"cleave jobs download: --out {args.out}: exists and is not a directory", file=sys.stderr)
                return 2
            job = client.get(args.job_id)
            out = Path(args.out or job.id)
            out.mkdir(parents=True, exist_ok=True)
            names = [args.artifact] if args.artifact else [a.name for a in job.artifacts]
            for name in names:
                digest = client.download(job.id, name, out / name)
                print(f"{out / name}  sha256 {digest}  verified")
        return 0
    finally:
        client.close()


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compress", help="submit a compression job, follow it, download and verify the artifacts")
    c.add_argument("--cloud", default="127.0.0.1:50051", help="cloud daemon host:port")
    src = c.add_argument_group("model")
    src.add_argument("--model", help="a torchvision architecture (weights=None, seeded)")
    src.add_argument("--transformer", choices=["bert", "roberta", "distilbert", "gpt2"], help="build from --config")
    src.add_argument("--upload", help="a .ts, .pt2 or .safetensors file (safetensors: give --arch)")
    src.add_argument("--arch", help="the architecture a safetensors state dict fits")
    src.add_argument("--config", help="Transformer config as JSON, e.g. '{\"num_hidden_layers\": 4}'")
    src.add_argument("--input-shape", help="e.g. 1,3,224,224")
    src.add_argument("--num-classes", type=int, help="classifier outputs (default: the architecture's)")
    src.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights")
    c.add_argument(
        "--engine", default="prune", help="prune, prune_cnn, prune_transformer, quantize, sweep or bottleneck"
    )
    c.add_argument("--ratio", type=float, default=0.5, help="CNN channel ratio removed")
    c.add_argument("--global", dest="global_pruning", action="store_true", help="rank channels across layers")
    c.add_argument(
        "--layer-ratio", action="append", default=[], metavar="MODULE=RATIO", help="this module's ratio; repeatable"
    )
    c.add_argument(
        "--ignore", action="append", default=[], metavar="MODULE", help="never prune this module; repeatable"
    )
    c.add_argument("--prune-classifier", action="store_true", help="prune the classifier's inputs too")
    c.add_argument("--round-to", type=int, default=0, help="keep channel counts multiples of this (0: any)")
    c.add_argument(
        "--importance",
        help="l1, l2, bn_scale (CNN); magnitude, gradient (Transformer) (default: the engine's, l1 / magnitude)",
    )
    c.add_argument("--head-ratio", type=float, default=0.0, help="Transformer: attention heads removed")
    c.add_argument("--ffn-ratio", type=float, default=0.0, help="Transformer: FFN channels removed")
    c.add_argument(
        "--bits", type=int, default=8, choices=QUANTIZE_BITS, metavar="{2,3,4,5,6,8}", help="quantize: weight bits"
    )
    c.add_argument("--clip", help="quantize: clipping (minmax, percentile, aciq, ...; lapq: optimised per layer)")
    c.add_argument("--per-tensor", action="store_true", help="quantize: one scale per tensor, not per channel")
    c.add_argument("--ratios", help="sweep: pruning ratios, e.g. 0,0.3,0.5")
    c.add_argument("--bits-grid", help="sweep: weight bits, each of 2,3,4,5,6,8,32, e.g. 32,8,4")
    c.add_argument("--parallelism", type=int, default=0, help="sweep: points run at once (0: the cloud decides)")
    b = c.add_argument_group("bottleneck (--engine bottleneck; see docs/bottleneck.md)")
    b.add_argument("--cuts", help="cut node names, comma-separated, or auto (default)")
    b.add_argument("--rate-weights", help="lambda per trained point (loss per kB/image), e.g. 0.01,0.05")
    b.add_argument("--target-bytes", type=float, default=0.0, help="steer lambda to this many bytes per image")
    b.add_argument("--latent", type=int, default=0, help="latent channels (default 8)")
    b.add_argument("--stride", type=int, default=0, help="1 or 2: halve the latent's height and width")
    b.add_argument("--budget", type=float, default=0.0, help="training seconds, all points together (default 120)")
    b.add_argument("--kind", choices=["conv", "affine"], help="conv (default) or affine: a step and offset per channel")
    b.add_argument("--temperature", type=float, default=0.0, help="distillation temperature (default 1)")
    b.add_argument("--margin-weight", type=float, default=0.0, help="weight of a hinge on the top-1 logit margin")
    b.add_argument("--mixup", type=float, default=0.0, help="share of batches mixed pairwise at the cut (0-1)")
    b.add_argument(
        "--levels", help="affine: untrained points with fixed steps (the largest feature / levels), e.g. 12,14"
    )
    b.add_argument("--dead-zone", type=float, default=0.0, help="affine: rounding offset in steps, 0-0.5 (default 0)")
    c.add_argument("--dataset", help="evaluation data: .npz or .safetensors with inputs and labels")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--label", help="free-form label shown in `cleave jobs list`")
    c.add_argument("--out", help="download directory (default: the job id)")
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")
    c.add_argument("--no-download", action="store_true", help="follow the job but leave the artifacts in the cloud")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    add_security_args(c)
    c.set_defaults(func=cmd_compress)

    j = sub.add_parser("jobs", help="list, show, watch, cancel or download compression jobs")
    j.add_argument("action", choices=["list", "show", "watch", "cancel", "download"], help="what to do")
    j.add_argument("job_id", nargs="?", help="the job (every action but list)")
    j.add_argument("--cloud", default="127.0.0.1:50051", help="cloud daemon host:port")
    j.add_argument("--artifact", help="download only this artifact")
    j.add_argument("--out", help="download directory (default: the job id)")
    j.add_argument("--limit", type=int, default=0, help="list: at most this many jobs (0: all)")
    j.add_argument("--json", action="store_true", help="machine-readable output")
    add_security_args(j)
    j.set_defaults(func=cmd_jobs)


__all__ = ["CompressionClient", "VerificationError", "add_commands", "follow"]
