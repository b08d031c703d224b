"""What an uploaded file declares, read from its headers without materialising its contents.

Every reader here is bounded: it reads a header of at most ``max_header`` bytes, never allocates what
the header declares, and checks the declaration against the file (a safetensors tensor's offsets
against the file size, an npz member's declared uncompressed size against its npy header's shape).
A bomb (a deflated npz member that expands to gigabytes, an npy header of shape 2^40, a safetensors
header declaring more bytes than it has) is refused here, in the daemon, with :class:`HeaderError`
naming what is wrong; the arrays themselves are only ever read in the job process.

A ``.pt2`` archive is checked the same way: its JSON members say which payloads are pickled, and any
archive that pickles something (weights, constants, custom objects, sample inputs, AOTInductor or
legacy ``.pt`` payloads) is refused without a byte of it being unpickled; the sample inputs every
archive carries (a ``torch.save`` pickle) are emptied by :func:`repack_pt2` before it is stored.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
NPY_MAGIC = b"\x93NUMPY"


class HeaderError(ValueError):
    """A file whose headers are malformed, inconsistent, or declare more than the limits allow."""


@dataclass(frozen=True)
class TensorInfo:
    """One array as its header declares it: a dtype name (safetensors or numpy) and a shape."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > 32:
        raise HeaderError(f"{where}: shape {value!r} is not a list of at most 32 sizes")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise HeaderError(f"{where}: shape {value!r} has a size that is not a non-negative integer")
    return tuple(value)


def safetensors_header(path: Path, max_header: int) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares; their offsets must tile the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("data: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > max_header or n > size - 8:
            raise HeaderError(
                f"data: not a safetensors file, or a header of {n} bytes over the limit "
                f"(jobs.max_header_bytes {max_header}; the file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"data: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise HeaderError("data: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"data: tensor {name[:100]!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{where}: needs exactly dtype, shape and data_offsets")
        dtype = entry["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise HeaderError(f"{where}: dtype {str(dtype)[:20]!r} is not a safetensors dtype")
        shape = _shape(entry["shape"], where)
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise HeaderError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
            raise HeaderError(
                f"{where}: shape {list(shape)} ({nbytes} bytes) does not match data_offsets {offsets} "
                f"in {data_bytes} bytes of data"
            )
        tensors[name] = TensorInfo(dtype, shape, nbytes)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise HeaderError("data: safetensors tensors overlap or leave gaps")
        covered = end
    if covered != data_bytes:
        raise HeaderError(f"data: safetensors tensors cover {covered} of {data_bytes} data bytes")
    return tensors


def _npy_header(f: Any, max_header: int, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) of the npy stream ``f`` positioned at its start."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=max_header)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=max_header)
        else:
            raise ValueError(f"npy version {version} is not supported")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise HeaderError(f"{where}: not an npy array ({str(exc).splitlines()[0][:200]})") from None
    if dtype.hasobject:
        raise HeaderError(f"{where}: an object array (needs pickle), refused")
    return dtype, _shape(list(shape), where), f.tell()


def npz_header(path: Path, max_header: int, max_bytes: int) -> dict[str, TensorInfo]:
    """The arrays of an npz (or a bare npy) file, from the zip directory and each member's npy header.

    Each member's declared uncompressed size must equal its npy header plus the bytes its shape and
    dtype need, and the members together may not exceed ``max_bytes``; nothing is decompressed
    beyond the headers.
    """
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            f.seek(0)
            dtype, shape, _ = _npy_header(f, max_header, "dataset")
            raise HeaderError(
                f"dataset: a bare .npy array (shape {list(shape)}, {dtype}), not an npz with inputs and labels"
            )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise HeaderError(f"dataset: not an npz file ({exc})") from None
    arrays: dict[str, TensorInfo] = {}
    total = 0
    with archive:
        members = archive.infolist()
        if len(members) > 64:
            raise HeaderError(f"dataset: {len(members)} members in the npz (at most 64)")
        for info in members:
            where = f"dataset.{info.filename[:100]}"
            if not info.filename.endswith(".npy") or info.is_dir():
                raise HeaderError(f"{where}: an npz holds only .npy members")
            total += info.file_size
            if total > max_bytes:
                raise HeaderError(
                    f"{where}: the arrays decompress to more than {max_bytes} bytes (jobs.max_dataset_bytes)"
                )
            try:
                with archive.open(info) as member:
                    dtype, shape, header_len = _npy_header(member, max_header, where)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
                # A local header that disagrees with the directory, an unknown compression or an
                # encrypted member: found by the fuzzer (it answered INTERNAL).
                raise HeaderError(f"{where}: unreadable npz member ({str(exc)[:200]})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if header_len + nbytes != info.file_size:
                raise HeaderError(
                    f"{where}: shape {list(shape)} of {dtype} needs {nbytes} bytes, "
                    f"the member declares {info.file_size - header_len}"
                )
            arrays[info.filename[: -len(".npy")]] = TensorInfo(dtype.str, shape, nbytes)
    return arrays


_INPUT_KINDS = {"F16", "F32", "F64", "U8", "I32", "I64"}
_LABEL_KINDS = {"U8", "I16", "I32", "I64"}
_NUMPY_TO_ST = {"f2": "F16", "f4": "F32", "f8": "F64", "u1": "U8", "i1": "I8", "i2": "I16", "i4": "I32", "i8": "I64"}


def check_dataset(arrays: dict[str, TensorInfo], max_samples: int, max_bytes: int) -> int:
    """Validate a dataset's declared arrays; returns its sample count. Raises HeaderError naming the field."""
    for key in ("inputs", "labels"):
        if key not in arrays:
            raise HeaderError(f"dataset.{key}: missing (the file has {sorted(arrays)[:10]})")
    inputs, labels = arrays["inputs"], arrays["labels"]
    kinds = {k: _NUMPY_TO_ST.get(a.dtype.lstrip("<>|="), a.dtype) for k, a in (("inputs", inputs), ("labels", labels))}
    if kinds["inputs"] not in _INPUT_KINDS:
        raise HeaderError(f"dataset.inputs: dtype {inputs.dtype} is not supported")
    if kinds["labels"] not in _LABEL_KINDS:
        raise HeaderError(f"dataset.labels: dtype {labels.dtype} is not an integer type")
    if len(labels.shape) != 1:
        raise HeaderError(f"dataset.labels: expected shape (N,), got {labels.shape}")
    if len(inputs.shape) < 2 or inputs.shape[0] != labels.shape[0]:
        raise HeaderError(f"dataset.inputs: shape {inputs.shape} does not have N={labels.shape[0]} rows")
    n = labels.shape[0]
    if not 0 < n <= max_samples:
        raise HeaderError(f"dataset.labels: {n} samples is not in 1..{max_samples} (jobs.max_dataset_samples)")
    total = sum(a.nbytes for a in arrays.values())
    if total > max_bytes:
        raise HeaderError(f"dataset: {total} bytes of arrays is over {max_bytes} (jobs.max_dataset_bytes)")
    return n


# .pt2 archives (torch.export.save): see torch/export/pt2_archive/_package.py.
_PT2_REFUSED_DIRS = (
    "data/aotinductor/",
    "data/executorch/",
    "data/mtia",
    "data/sample_inputs/",
    "xl_model_weights/",
)


def check_pt2(path: Path, max_header: int) -> list[str]:
    """Refuse a ``.pt2`` archive that pickles anything; returns the names of its programs.

    Reads only the archive's JSON members (``models/*.json`` is not parsed beyond being JSON; the
    ``*_weights_config.json`` and ``*_constants_config.json`` payload configs must say
    ``use_pickle: false`` for every entry and name only raw tensor payloads).
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise HeaderError("data: not an EXPORTED_PROGRAM archive (not a zip file; truncated?)") from None
    with archive:
        infos = archive.infolist()
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1:
            raise HeaderError("data: not an EXPORTED_PROGRAM archive (more than one root folder)")
        root = roots.pop() + "/"
        names = {i.filename[len(root) :]: i for i in infos}
        if "archive_format" not in names or archive.read(names["archive_format"]).strip() != b"pt2":
            raise HeaderError("data: not an EXPORTED_PROGRAM archive (no archive_format 'pt2')")
        programs = [n[len("models/") : -len(".json")] for n in names if n.startswith("models/") and n.endswith(".json")]
        if not programs:
            raise HeaderError("data: not an EXPORTED_PROGRAM archive (no models/*.json)")

        def read_json(name: str) -> Any:
            info = names[name]
            if info.file_size > max_header:
                raise HeaderError(f"data: {name} is {info.file_size} bytes (jobs.max_header_bytes {max_header})")
            try:
                return json.loads(archive.read(info))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise HeaderError(f"data: {name} is not JSON") from None

        allowed = set()
        for program in programs:
            read_json(f"models/{program}.json")
            allowed.add(f"models/{program}.json")
            for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
                config_name = f"data/{kind}/{program}_{kind}_config.json"
                if f"data/{kind}/{program}.pt" in names:
                    raise HeaderError(f"data: {kind} in the legacy pickled format (data/{kind}/{program}.pt), refused")
                if config_name not in names:
                    continue
                allowed.add(config_name)
                config = read_json(config_name)
                entries = config.get("config", {}) if isinstance(config, dict) else None
                if not isinstance(entries, dict):
                    raise HeaderError(f"data: {config_name} has no config mapping")
                for fqn, meta in entries.items():
                    if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                        raise HeaderError(
                            f"data: {kind} {str(fqn)[:100]!r} is pickled (use_pickle), refused: "
                            "a .pt2 may hold only raw tensors"
                        )
                    payload = meta.get("path_name", "")
                    if not (
                        isinstance(payload, str) and payload.startswith(prefix) and payload[len(prefix) :].isdigit()
                    ):
                        raise HeaderError(f"data: {kind} {str(fqn)[:100]!r} names payload {payload!r}, refused")
                    allowed.add(f"data/{kind}/{payload}")
        samples = {f"data/sample_inputs/{p}.pt" for p in programs}
        for name in names:
            if name in samples:
                continue  # a torch.save pickle in every archive: emptied by repack_pt2, never read
            if name.startswith(_PT2_REFUSED_DIRS) or name.endswith((".pt", ".pkl", ".pickle")):
                raise HeaderError(f"data: {name} may hold a pickle or compiled code, refused")
            if name.startswith("data/") and name not in allowed:
                raise HeaderError(f"data: {name} is not a raw tensor payload named by a config, refused")
    return programs


def repack_pt2(src: Path, dst: Path, programs: list[str], max_bytes: int) -> None:
    """Copy a checked archive with its sample inputs emptied (torch.export.load would unpickle them,
    falling back to ``weights_only=False``); at most ``max_bytes`` are decompressed."""
    samples = {f"data/sample_inputs/{p}.pt" for p in programs}
    budget = max_bytes
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if rel in samples:
                zout.writestr(info.filename, b"")
                continue
            if info.file_size > budget:
                raise HeaderError(f"data: the archive decompresses to more than {max_bytes} bytes")
            budget -= info.file_size
            with zin.open(info) as fin, zout.open(info.filename, "w") as fout:
                copied = 0
                while block := fin.read(1 << 20):
                    copied += len(block)
                    if copied > info.file_size:
                        raise HeaderError(f"data: {info.filename} is longer than its declared size")
                    fout.write(block)


def check_torchscript(path: Path) -> None:
    """A TorchScript archive has code/ and constants; nothing here makes it safe (it is code)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise HeaderError("data: not a TORCHSCRIPT archive (not a zip file; truncated?)") from None
    if not any("/code/" in n for n in names):
        raise HeaderError("data: not a TorchScript archive (no code/; a torch.save pickle is refused)")
