"""Receiving an upload: size limits while it streams, then format checks before it enters the store.

The bytes go to a temporary file; only a file that passes every check is published under
``uploads/`` and recorded, so a refused upload (truncated, wrong type, over the limit, a pickle)
leaves the store exactly as it was. Nothing is unpickled: TorchScript and ``.pt2`` archives load
through their own loaders, state dicts and datasets through safetensors / ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protos.cleave.v1 import compression_pb2 as pb
from protos.errors import InvalidArgument, ResourceExhausted, enum_name

from .datasets import DatasetError, load_dataset
from .store import JobStore, UploadRecord, publish

EXTENSIONS = {
    "TORCHSCRIPT": ".ts",
    "EXPORTED_PROGRAM": ".pt2",
    "SAFETENSORS": ".safetensors",
    "DATASET_NPZ": ".npz",
    "DATASET_SAFETENSORS": ".safetensors",
}


def receive(store: JobStore, chunks: Iterable[pb.UploadChunk], max_bytes: int) -> UploadRecord:
    """Consume an UploadModel stream; returns the stored record.

    Raises:
        InvalidArgument: naming the field (header, format, data) that is wrong.
        ResourceExhausted: the upload is over ``max_bytes``.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("upload: the first message must carry a header")
    header = first.header
    fmt = enum_name(pb.UploadFormat, header.format, "header.format")
    if fmt not in EXTENSIONS:
        raise InvalidArgument(f"header.format: {fmt} is not one of {', '.join(EXTENSIONS)}")
    if header.total_bytes > max_bytes:
        raise ResourceExhausted(f"upload: {header.total_bytes} bytes is over the {max_bytes} byte limit")
    if fmt == "SAFETENSORS" and not header.architecture:
        raise InvalidArgument("header.architecture: a safetensors state dict needs the architecture it fits")
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
        meta = {
            "architecture": header.architecture,
            "config_json": header.config_json,
            "num_classes": header.num_classes,
            "input_shape": list(header.input_shape),
        }
        kind = inspect_upload(tmp, fmt, meta)
        upload_id = ("d-" if kind == "dataset" else "m-") + uuid.uuid4().hex[:16]
        dest = store.uploads_dir / f"{upload_id}{EXTENSIONS[fmt]}"
        publish(tmp, dest)
        record = UploadRecord(upload_id, header.name or upload_id, fmt, kind, dest, size, sha, meta, time.time())
        store.insert_upload(record)
        return record
    finally:
        tmp.unlink(missing_ok=True)


def inspect_upload(path: Path, fmt: str, meta: dict[str, Any]) -> str:
    """Check the file is what its header says; returns its kind (cnn, transformer, model, dataset)."""
    head = path.read_bytes()[:8]
    if head[:1] == b"\x80":
        raise InvalidArgument(f"data: a Python pickle, refused (uploads are {', '.join(EXTENSIONS)}; never pickle)")
    if fmt.startswith("DATASET"):
        try:
            load_dataset(path, "npz" if fmt == "DATASET_NPZ" else "safetensors")
        except DatasetError as exc:
            raise InvalidArgument(str(exc)) from None
        return "dataset"
    import torch

    from . import models

    if fmt in ("TORCHSCRIPT", "EXPORTED_PROGRAM"):
        if not zipfile.is_zipfile(path):
            raise InvalidArgument(f"data: not a {fmt} archive (not a zip file; truncated?)")
        names = zipfile.ZipFile(path).namelist()
        if fmt == "TORCHSCRIPT" and not any("/code/" in n for n in names):
            raise InvalidArgument("data: not a TorchScript archive (no code/; a torch.save pickle is refused)")
        try:
            if fmt == "TORCHSCRIPT":
                model = torch.jit.load(str(path), map_location="cpu")
            else:
                model = torch.export.load(str(path)).module()
        except Exception as exc:  # noqa: BLE001 - any loader failure is the upload's fault
            raise InvalidArgument(f"data: not a loadable {fmt} archive ({type(exc).__name__})") from None
        return models.kind_of(model)
    try:
        from safetensors.torch import load_file

        load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"data: not a safetensors file ({type(exc).__name__}: {exc})") from None
    if meta["config_json"]:
        try:
            json.loads(meta["config_json"])
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"header.config_json: not JSON ({exc})") from None
    source = models.ModelSource(upload_path=str(path), upload_format=fmt, upload_meta=meta)
    try:
        model, _ = models.load(source)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, state dict that does not fit
        raise InvalidArgument(
            f"header.architecture: the state dict does not fit {meta['architecture']!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        ) from None
    return models.kind_of(model)
