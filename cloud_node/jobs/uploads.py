"""Receiving an upload: size limits while it streams, then format checks before it enters the store.

The bytes go to a temporary file; only a file that passes every check is committed (row first,
then the rename into ``uploads/``, see :meth:`.store.JobStore.commit_upload`), so a refused upload
(truncated, wrong type, over a limit, a pickle) leaves the store exactly as it was.

Nothing from the network is executed or unpickled in the daemon, and nothing is materialised from
what a header declares: safetensors and dataset files are checked from their headers alone
(:mod:`.headers`); a safetensors state dict against its architecture built on the ``meta`` device.
TorchScript and ``.pt2`` carry code (and ``.pt2`` may carry pickles): they are refused unless
``jobs.allow_code_uploads`` is on, and even then they are only opened in a sandboxed process
(``inspect_code``); a ``.pt2`` that pickles anything is refused from its JSON without being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import InvalidArgument, PermissionDenied, ResourceExhausted, enum_name

from . import headers, models
from .datasets import DatasetError, DatasetLimits, check_upload
from .store import JobStore, UploadRecord

EXTENSIONS = {
    "TORCHSCRIPT": ".ts",
    "EXPORTED_PROGRAM": ".pt2",
    "SAFETENSORS": ".safetensors",
    "DATASET_NPZ": ".npz",
    "DATASET_SAFETENSORS": ".safetensors",
}
CODE_FORMATS = ("TORCHSCRIPT", "EXPORTED_PROGRAM")


@dataclass(frozen=True)
class UploadPolicy:
    """The limits an upload is held to (from ``jobs:``)."""

    max_bytes: int = 1 << 30
    allow_code: bool = False
    max_header: int = 16 << 20
    max_num_classes: int = 100_000
    max_parameters: int = 2_000_000_000
    dataset: DatasetLimits = DatasetLimits()


def receive(
    store: JobStore,
    chunks: Iterable[pb.UploadChunk],
    policy: UploadPolicy,
    *,
    client: str = "",
    admit: Callable[[int], None] = lambda _size: None,
    inspect_code: Callable[[Path, str, dict[str, Any]], str] | None = None,
) -> UploadRecord:
    """Consume an UploadModel stream; returns the stored record.

    ``admit(size)`` raises ResourceExhausted when the client's or the store's upload quota cannot
    take ``size`` more bytes; it is called with the declared size before any data is read, and
    under the commit with the real size. ``inspect_code(path, format, meta)`` opens a code upload
    in a sandbox and returns its kind.

    Raises:
        InvalidArgument: naming the field (header, format, data) that is wrong.
        PermissionDenied: a TorchScript / .pt2 upload while ``jobs.allow_code_uploads`` is off.
        ResourceExhausted: the upload is over ``max_bytes`` or a quota.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("upload: the first message must carry a header")
    header = first.header
    fmt = enum_name(pb.UploadFormat, header.format, "header.format")
    if fmt not in EXTENSIONS:
        raise InvalidArgument(f"header.format: {fmt} is not one of {', '.join(EXTENSIONS)}")
    if fmt in CODE_FORMATS and not policy.allow_code:
        raise PermissionDenied(
            f"header.format: {fmt} uploads carry code and are refused (jobs.allow_code_uploads is off; "
            "upload SAFETENSORS weights with their architecture instead)"
        )
    max_bytes = policy.max_bytes
    if header.total_bytes > max_bytes:
        raise ResourceExhausted(f"upload: {header.total_bytes} bytes is over the {max_bytes} byte limit")
    meta = check_header(header, fmt, policy)
    admit(header.total_bytes)
    tmp = store.temp_path(EXTENSIONS[fmt])
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for msg in it:
                if msg.WhichOneof("part") != "data":
                    raise InvalidArgument("upload: only the first message may carry a header")
                size += len(msg.data)
                if size > max_bytes:
                    raise ResourceExhausted(f"upload: more than the {max_bytes} byte limit")
                digest.update(msg.data)
                f.write(msg.data)
        if size == 0:
            raise InvalidArgument("upload: no data")
        if header.total_bytes and size != header.total_bytes:
            raise InvalidArgument(
                f"upload: truncated or padded: received {size} bytes, header.total_bytes says {header.total_bytes}"
            )
        sha = digest.hexdigest()
        if header.sha256 and header.sha256.lower() != sha:
            raise InvalidArgument(f"header.sha256: the data hashes to {sha}, not {header.sha256}")
        kind = inspect_upload(tmp, fmt, meta, policy, inspect_code)
        upload_id = ("d-" if kind == "dataset" else "m-") + uuid.uuid4().hex[:16]
        dest = store.uploads_dir / f"{upload_id}{EXTENSIONS[fmt]}"
        # size and sha256 are of the bytes received (what the client can check); a .pt2 is stored repacked.
        record = UploadRecord(
            upload_id, header.name or upload_id, fmt, kind, dest, size, sha, meta, time.time(), client
        )
        store.commit_upload(tmp, record, lambda: admit(size))
        return record
    finally:
        tmp.unlink(missing_ok=True)


def check_header(header: pb.UploadHeader, fmt: str, policy: UploadPolicy) -> dict[str, Any]:
    """The upload header's own fields, before any data is read."""
    if fmt == "SAFETENSORS" and not header.architecture:
        raise InvalidArgument("header.architecture: a safetensors state dict needs the architecture it fits")
    if header.architecture:
        try:
            models.check_architecture(header.architecture)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    if header.num_classes > policy.max_num_classes:
        raise InvalidArgument(
            f"header.num_classes: {header.num_classes} is over {policy.max_num_classes} (jobs.max_num_classes)"
        )
    if len(header.input_shape) > 8 or any(not 0 < d <= 1 << 16 for d in header.input_shape):
        raise InvalidArgument(f"header.input_shape: {list(header.input_shape)[:10]} is not up to 8 sizes in 1..65536")
    if len(header.config_json) > 64 << 10:
        raise InvalidArgument("header.config_json: over 64 KiB")
    if header.config_json:
        try:
            models.check_config(json.loads(header.config_json), "header.config_json")
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"header.config_json: not JSON ({exc})") from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    return {
        "architecture": header.architecture,
        "config_json": header.config_json,
        "num_classes": header.num_classes,
        "input_shape": list(header.input_shape),
    }


def inspect_upload(
    path: Path,
    fmt: str,
    meta: dict[str, Any],
    policy: UploadPolicy,
    inspect_code: Callable[[Path, str, dict[str, Any]], str] | None = None,
) -> str:
    """Check the file is what its header says; returns its kind (cnn, transformer, model, dataset)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80":
        raise InvalidArgument(f"data: a Python pickle, refused (uploads are {', '.join(EXTENSIONS)}; never pickle)")
    try:
        if fmt.startswith("DATASET"):
            check_upload(path, "npz" if fmt == "DATASET_NPZ" else "safetensors", policy.dataset)
            return "dataset"
        if fmt == "SAFETENSORS":
            declared = headers.safetensors_header(path, policy.max_header)
            params = sum(math.prod(t.shape) for t in declared.values())
            if params > policy.max_parameters:
                raise InvalidArgument(
                    f"data: {params} parameters is over {policy.max_parameters} (jobs.max_model_parameters)"
                )
            try:
                return models.kind_of(models.check_state_dict(meta, declared))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - a builder refusing the config is the upload's fault
                raise InvalidArgument(
                    f"header.architecture: {meta['architecture']!r} cannot be built from this header "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
                ) from None
        if fmt == "EXPORTED_PROGRAM":
            programs = headers.check_pt2(path, policy.max_header)
            packed = path.with_suffix(".repacked")
            try:
                headers.repack_pt2(path, packed, programs, policy.max_bytes)
                packed.replace(path)
            finally:
                packed.unlink(missing_ok=True)
        else:
            headers.check_torchscript(path)
    except (headers.HeaderError, DatasetError) as exc:
        raise InvalidArgument(str(exc)) from None
    if inspect_code is None:
        raise PermissionDenied(f"header.format: {fmt} uploads need jobs.allow_code_uploads and a job sandbox")
    return inspect_code(path, fmt, meta)
