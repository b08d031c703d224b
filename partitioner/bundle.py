"""Edge bundles: what a torch-free edge needs to serve and plan a model, in one verified directory.

A bundle is a directory::

    manifest.json          format, model (name, fingerprint, input), cuts, files with sha256 and size
    model.onnx             the whole model (edge-only plans and the local fallback)
    cuts/<k>.onnx          the float head of candidate cut k (returns the cut's live set)
    cuts/<k>.int8.onnx     the same head on int8 kernels (ONNX Runtime QOperator)
    planning.json          the planner's tables: the build host's per-node profile, the bytes of
                           every encoding at every cut, the output distortion of every candidate
                           on the calibration images, head weights and memory

:func:`partitioner.bundler.build_bundle` (torch) writes one; :meth:`EdgeBundle.open` (this module,
no torch) reads one and refuses it unless every file listed has exactly its size and sha256, no
file escapes the directory, and the manifest and the tables agree on the model's fingerprint.
Errors are :class:`BundleError` subclasses whose message starts with the file and field at fault.
Files are hashed again when they are read for use (:meth:`EdgeBundle.read`), so a file changed
after the bundle was opened is refused too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .costmodel import CostModel, CutCost
from .profile import CodecCost, Profile

FORMAT = "cleave.edge_bundle/1"
MANIFEST = "manifest.json"
PLANNING = "planning.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest or planning table larger than this is not one
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file (and field) at fault."""


class BundleFormatError(BundleError):
    """A manifest or table that is not what the format says (missing or ill-typed field)."""


class BundleIntegrityError(BundleError):
    """A file whose bytes are not the ones the manifest lists: changed, truncated, missing or extra."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class BundleCut:
    """A candidate cut of a bundle: where it is, what crosses, and its two head files.

    Has the attributes of :class:`partitioner.graph.Cut` the edge reads (``index``, ``name``,
    ``live``, ``shapes``, ``dtypes``, ``nbytes``), so the runtime treats both alike.
    """

    index: int
    name: str
    live: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    head: str  # file of the float head
    head_int8: str  # file of the int8 head

    @property
    def nbytes(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 4
            for d in shape:
                n *= d
            total += n
        return total


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, checked."""

    name: str
    fingerprint: str
    input_shape: tuple[int, ...]
    input_dtype: str
    outputs: int
    whole: str  # file of the whole model
    planning: str  # file of the planning tables
    cuts: tuple[BundleCut, ...]
    files: Mapping[str, FileEntry]
    source: str = ""  # the model spec's source at build time (informative)
    built_with: Mapping[str, str] = field(default_factory=dict)  # versions of the builder's tools

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "model": {
                "name": self.name,
                "fingerprint": self.fingerprint,
                "input_shape": list(self.input_shape),
                "input_dtype": self.input_dtype,
                "outputs": self.outputs,
                "source": self.source,
            },
            "whole": self.whole,
            "planning": self.planning,
            "cuts": [
                {
                    "index": c.index,
                    "name": c.name,
                    "features": [
                        {"name": n, "shape": list(s), "dtype": d}
                        for n, s, d in zip(c.live, c.shapes, c.dtypes, strict=True)
                    ],
                    "head": c.head,
                    "head_int8": c.head_int8,
                }
                for c in self.cuts
            ],
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in sorted(self.files.items())},
            "built_with": dict(self.built_with),
        }
        return json.dumps(data, indent=1) + "\n"


@dataclass
class PlanningTables:
    """``planning.json``: what the planner needs that only torch could measure, measured at build time.

    ``profile``: the build host's per-node profile (the shape of the latency curve; the edge
    re-anchors it on its own timings of the bundle's heads). ``costs``: cut 0 and every candidate
    cut, with the encoded bytes of every encoding on the calibration images. ``distortion``:
    ``"<cut index>|<encoding>" -> (relative error, top-1 agreement)`` on those images, splits running
    the float heads; ``distortion_int8``: the same for splits running the bundle's int8 heads (what an
    edge with ``head.weight_bits: 8`` serves). None in bundles built before it was measured.
    """

    fingerprint: str
    profile: Profile
    costs: list[CutCost]
    output_bytes: int
    edge_model_memory: int
    distortion: dict[str, tuple[float, float]]
    calibration: dict[str, Any]
    reply_bytes: int = 0  # the outputs coded as a lossy plan's reply (CostModel.reply_bytes); 0: not measured
    distortion_int8: dict[str, tuple[float, float]] | None = None

    def to_json(self) -> str:
        from dataclasses import asdict

        return (
            json.dumps(
                {
                    "fingerprint": self.fingerprint,
                    "profile": json.loads(self.profile.to_json()),
                    "costs": [asdict(c) for c in self.costs],
                    "output_bytes": self.output_bytes,
                    "reply_bytes": self.reply_bytes,
                    "edge_model_memory": self.edge_model_memory,
                    "distortion": {k: list(v) for k, v in sorted(self.distortion.items())},
                    **(
                        {}
                        if self.distortion_int8 is None
                        else {"distortion_int8": {k: list(v) for k, v in sorted(self.distortion_int8.items())}}
                    ),
                    "calibration": self.calibration,
                },
                indent=1,
            )
            + "\n"
        )

    def cost_model(self, edge: Profile, cloud: Profile, name: str) -> CostModel:
        """The planner's :class:`CostModel` for the bundle's cuts, from the two hosts' profiles.

        Mirrors :meth:`CostModel.measure` with the byte counts read from the tables instead of
        encoded here: E(k) from ``edge``, C(k) from ``cloud``, codec costs per MB from each.
        """
        edge_curve, cloud_curve = edge.curve(), cloud.curve()
        cuts = []
        for table in self.costs:
            mb = table.raw_bytes / 1e6
            cost = CutCost(
                index=table.index,
                name=table.name,
                edge_ms=edge_curve.head_ms(table.index) if table.index else 0.0,
                cloud_ms=cloud_curve.tail_ms(table.index) if table.index else cloud_curve.total_ms,
                raw_bytes=table.raw_bytes,
                edge_memory=table.edge_memory,
                weight_bytes=table.weight_bytes,
                feature_bytes=dict(table.feature_bytes),
            )
            for enc in cost.feature_bytes:
                key = _codec_key(enc)
                if key == "webp" and key not in edge.codecs:
                    key = "jpeg"
                cost.encode_ms[enc] = edge.codecs[key].encode_ms_per_mb * mb if key in edge.codecs else 0.0
                cost.decode_ms[enc] = cloud.codecs[key].decode_ms_per_mb * mb if key in cloud.codecs else 0.0
            cuts.append(cost)
        return CostModel(name, cuts, edge.total_ms, self.edge_model_memory, self.output_bytes, self.reply_bytes)


def _codec_key(enc: str) -> str:
    from .costmodel import _codec_key as key

    return key(enc)


class EdgeBundle:
    """An opened, verified bundle. Open with :meth:`open`."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self._by_index = {c.index: c for c in manifest.cuts}
        self._by_name = {c.name: c for c in manifest.cuts}

    @classmethod
    def open(cls, path: str | Path, expect_fingerprint: str | None = None) -> EdgeBundle:
        """Read ``path/manifest.json`` and verify every file it lists (size and sha256).

        ``expect_fingerprint``: refuse a bundle of another model (the fingerprint a config or the
        cloud names). Raises :class:`BundleError` (a subclass) naming the file and field at fault.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {root}: not a directory")
        manifest = parse_manifest(_read_small(root / MANIFEST), str(root / MANIFEST))  # errors name the bundle
        for name, entry in manifest.files.items():
            _verify(root, name, entry)
        listed = set(manifest.files) | {MANIFEST}
        extra = sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in listed
        )
        if extra:
            raise BundleIntegrityError(f"bundle {root}: files not in the manifest: {', '.join(extra[:5])}")
        bundle = cls(root, manifest)
        tables = bundle.planning()
        if tables.fingerprint != manifest.fingerprint:
            raise BundleFormatError(
                f"{root / manifest.planning}: fingerprint {tables.fingerprint[:12]} is not the manifest's "
                f"{manifest.fingerprint[:12]}"
            )
        if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
            raise BundleError(
                f"{root / MANIFEST}: model.fingerprint {manifest.fingerprint[:12]} is not the expected "
                f"{expect_fingerprint[:12]} (a bundle of another model or weights)"
            )
        return bundle

    def read(self, name: str) -> bytes:
        """The bytes of the listed file ``name``, verified again against the manifest."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BundleFormatError(f"{self.root / MANIFEST}: {name!r} is not a listed file")
        return _verify(self.root, name, entry, keep=True)

    def planning(self) -> PlanningTables:
        """``planning.json``, verified and parsed."""
        return parse_planning(self.read(self.manifest.planning), str(self.root / self.manifest.planning))

    def cut(self, key: int | str) -> BundleCut:
        """A candidate cut by index or name; KeyError naming the candidates otherwise."""
        found = self._by_index.get(key) if isinstance(key, int) else self._by_name.get(str(key))
        if found is None and isinstance(key, str) and key.lstrip("-").isdigit():
            found = self._by_index.get(int(key))
        if found is None:
            names = ", ".join(f"{c.name} (#{c.index})" for c in self.manifest.cuts)
            raise KeyError(f"{key!r} is not a cut of this bundle (it has {names})")
        return found

    @property
    def size_bytes(self) -> int:
        return sum(e.bytes for e in self.manifest.files.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_path(root: Path, name: str, where: str) -> Path:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise BundleFormatError(f"{root / MANIFEST}: {where}: {name!r} is not a relative path inside the bundle")
    return root / name


def _verify(root: Path, name: str, entry: FileEntry, keep: bool = False) -> bytes:
    path = _safe_path(root, name, "files")
    try:
        if path.is_symlink() or not path.is_file():
            raise BundleIntegrityError(f"{path}: missing (or not a regular file)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleIntegrityError(f"{path}: {size} bytes, the manifest says {entry.bytes} (truncated or changed)")
        data = path.read_bytes() if keep else b""
    except OSError as exc:
        raise BundleIntegrityError(f"{path}: cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest() if keep else sha256_file(path)
    if (keep and len(data) != entry.bytes) or digest != entry.sha256:
        raise BundleIntegrityError(f"{path}: sha256 {digest[:16]}... is not the manifest's {entry.sha256[:16]}...")
    return data


def _read_small(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleFormatError(f"{path}: {size} bytes, over the {MAX_MANIFEST_BYTES} a manifest may have")
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleFormatError(f"{path}: missing (not a bundle)") from None
    except OSError as exc:
        raise BundleFormatError(f"{path}: cannot be read ({exc.strerror})") from None


def _load_json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"{where}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BundleFormatError(f"{where}: not a JSON object")
    return value


def _get(data: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BundleFormatError(f"{where}: {key}: missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleFormatError(f"{where}: {key}: expected {names}, got {type(value).__name__}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BundleFormatError(f"{where}: expected a list of non-negative ints, got {value!r}")
    return tuple(value)


def parse_manifest(data: bytes, where: str = MANIFEST) -> Manifest:
    """A manifest from its JSON bytes; BundleFormatError naming the field otherwise."""
    doc = _load_json(data, where)
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise BundleFormatError(f"{where}: format: {fmt!r} is not {FORMAT!r}")
    model = _get(doc, "model", dict, where)
    fp = _get(model, "fingerprint", str, f"{where}: model")
    if not _HEX64.fullmatch(fp):
        raise BundleFormatError(f"{where}: model.fingerprint: {fp[:80]!r} is not a sha256 hex digest")
    files = {}
    for name, entry in _get(doc, "files", dict, where).items():
        at = f"{where}: files[{name!r}]"
        if not isinstance(entry, dict):
            raise BundleFormatError(f"{at}: expected an object")
        sha = _get(entry, "sha256", str, at)
        if not _HEX64.fullmatch(sha):
            raise BundleFormatError(f"{at}.sha256: {sha[:80]!r} is not a sha256 hex digest")
        size = _get(entry, "bytes", int, at)
        if size < 0:
            raise BundleFormatError(f"{at}.bytes: {size} is negative")
        files[name] = FileEntry(sha, size)
    cuts = []
    for i, c in enumerate(_get(doc, "cuts", list, where)):
        at = f"{where}: cuts[{i}]"
        if not isinstance(c, dict):
            raise BundleFormatError(f"{at}: expected an object")
        feats = _get(c, "features", list, at)
        if not feats:
            raise BundleFormatError(f"{at}.features: empty")
        live, shapes, dtypes = [], [], []
        for j, f in enumerate(feats):
            fat = f"{at}.features[{j}]"
            if not isinstance(f, dict):
                raise BundleFormatError(f"{fat}: expected an object")
            live.append(_get(f, "name", str, fat))
            shapes.append(_shape(f.get("shape"), f"{fat}.shape"))
            dtypes.append(_get(f, "dtype", str, fat))
        index = _get(c, "index", int, at)
        if index < 1:
            raise BundleFormatError(f"{at}.index: {index} is not a split (cut 0 is the input)")
        cut = BundleCut(
            index=index,
            name=_get(c, "name", str, at),
            live=tuple(live),
            shapes=tuple(shapes),
            dtypes=tuple(dtypes),
            head=_get(c, "head", str, at),
            head_int8=_get(c, "head_int8", str, at),
        )
        for key in ("head", "head_int8"):
            if getattr(cut, key) not in files:
                raise BundleFormatError(f"{at}.{key}: {getattr(cut, key)!r} is not in files")
        cuts.append(cut)
    manifest = Manifest(
        name=_get(model, "name", str, f"{where}: model"),
        fingerprint=fp,
        input_shape=_shape(model.get("input_shape"), f"{where}: model.input_shape"),
        input_dtype=_get(model, "input_dtype", str, f"{where}: model"),
        outputs=_get(model, "outputs", int, f"{where}: model"),
        whole=_get(doc, "whole", str, where),
        planning=_get(doc, "planning", str, where),
        cuts=tuple(sorted(cuts, key=lambda c: c.index)),
        files=files,
        source=str(model.get("source", "")),
        built_with={str(k): str(v) for k, v in dict(doc.get("built_with") or {}).items()},
    )
    for key in ("whole", "planning"):
        if getattr(manifest, key) not in files:
            raise BundleFormatError(f"{where}: {key}: {getattr(manifest, key)!r} is not in files")
    if len({c.index for c in cuts}) != len(cuts):
        raise BundleFormatError(f"{where}: cuts: an index is listed twice")
    return manifest


def parse_planning(data: bytes, where: str = PLANNING) -> PlanningTables:
    """Planning tables from their JSON bytes; BundleFormatError naming the field otherwise."""
    doc = _load_json(data, where)
    try:
        profile = Profile.from_json(json.dumps(_get(doc, "profile", dict, where)))
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BundleFormatError(f"{where}: profile: {exc}") from None
    costs = []
    for i, c in enumerate(_get(doc, "costs", list, where)):
        at = f"{where}: costs[{i}]"
        if not isinstance(c, dict):
            raise BundleFormatError(f"{at}: expected an object")
        fb = _get(c, "feature_bytes", dict, at)
        if not all(isinstance(v, int) and v >= 0 for v in fb.values()):
            raise BundleFormatError(f"{at}.feature_bytes: expected non-negative ints")
        costs.append(
            CutCost(
                index=_get(c, "index", int, at),
                name=_get(c, "name", str, at),
                edge_ms=0.0,
                cloud_ms=0.0,
                raw_bytes=_get(c, "raw_bytes", int, at),
                edge_memory=_get(c, "edge_memory", int, at),
                weight_bytes=_get(c, "weight_bytes", int, at),
                feature_bytes={str(k): int(v) for k, v in fb.items()},
            )
        )
    if not costs or costs[0].index != 0:
        raise BundleFormatError(f"{where}: costs: the first entry must be cut 0 (the input)")
    distortion = _distortion_table(doc, "distortion", where)
    # Optional: bundles built before int8 heads' accuracy was measured have none (see PlanningTables).
    distortion_int8 = _distortion_table(doc, "distortion_int8", where) if "distortion_int8" in doc else None
    return PlanningTables(
        fingerprint=_get(doc, "fingerprint", str, where),
        profile=profile,
        costs=costs,
        output_bytes=_get(doc, "output_bytes", int, where),
        edge_model_memory=_get(doc, "edge_model_memory", int, where),
        distortion=distortion,
        calibration=dict(_get(doc, "calibration", dict, where)),
        # Optional: bundles made before replies were coded price every reply as float32.
        reply_bytes=_get(doc, "reply_bytes", int, where) if "reply_bytes" in doc else 0,
        distortion_int8=distortion_int8,
    )


def _distortion_table(doc: dict, field: str, where: str) -> dict[str, tuple[float, float]]:
    table = {}
    for key, value in _get(doc, field, dict, where).items():
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        if not ok:
            raise BundleFormatError(f"{where}: {field}[{key!r}]: expected [rel_error, top1]")
        table[str(key)] = (float(value[0]), float(value[1]))
    return table


__all__ = [
    "FORMAT",
    "BundleCut",
    "BundleError",
    "BundleFormatError",
    "BundleIntegrityError",
    "CodecCost",
    "EdgeBundle",
    "FileEntry",
    "Manifest",
    "PlanningTables",
    "parse_manifest",
    "parse_planning",
    "sha256_file",
]
