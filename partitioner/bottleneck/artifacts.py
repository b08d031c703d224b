"""A trained bottleneck as files: safetensors weights and a JSON description, no pickle.

Three files, written by :func:`save` and read back by :func:`load`:

* ``bottleneck.json``: format version, the base model (its source and fingerprint), the cut
  (index and node name), the architecture (:class:`BottleneckConfig`), the feature shape at the
  cut, the coder's table range, and the sha256 of both weight files;
* ``bottleneck.edge.safetensors``: the encoder's weights and the coder's tables (``pmf``): what
  the edge needs after its own copy of the original model's head;
* ``bottleneck.cloud.safetensors``: the decoder's weights, the tables and the prior's parameters.

:func:`fingerprint` hashes the description and both weight files, so a session whose edge and
cloud hold different bottlenecks (or the same bottleneck over different base models) is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compressor.entropy import EntropyTables

from .modules import BottleneckConfig, FactorizedPrior, make_modules
from .train import Bottleneck

__all__ = ["CLOUD_FILE", "DESCRIPTION", "EDGE_FILE", "FORMAT", "fingerprint", "load", "save"]

FORMAT = "cleave-bottleneck/1"
DESCRIPTION = "bottleneck.json"
EDGE_FILE = "bottleneck.edge.safetensors"
CLOUD_FILE = "bottleneck.cloud.safetensors"
MAX_DESCRIPTION_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(bneck: Bottleneck, directory: str | Path, base: dict[str, Any]) -> dict[str, Any]:
    """Write the three files into ``directory``; return the description.

    ``base`` describes the original model: at least ``fingerprint`` (see
    :func:`partitioner.models.fingerprint`) and ``source`` (e.g. the model spec's source).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pmf = torch.from_numpy(bneck.tables.pmf.copy())
    edge = {f"encoder.{k}": v.detach().contiguous() for k, v in bneck.encoder.state_dict().items()}
    cloud = {f"decoder.{k}": v.detach().contiguous() for k, v in bneck.decoder.state_dict().items()}
    cloud.update({f"prior.{k}": v.detach().contiguous() for k, v in bneck.prior.state_dict().items()})
    edge["pmf"] = cloud["pmf"] = pmf
    save_file(edge, str(out / EDGE_FILE))
    save_file(cloud, str(out / CLOUD_FILE))
    desc = {
        "format": FORMAT,
        "base": base,
        "cut": {"index": bneck.cut[0], "name": bneck.cut[1]},
        "architecture": {
            "encoder": type(bneck.encoder).__name__,
            "decoder": type(bneck.decoder).__name__,
            **bneck.config.to_dict(),
        },
        "feature_shape": list(bneck.feature_shape),
        "latent_shape": list(bneck.latent_shape(1)[1:]),
        "prior": {"kind": "factorized", "filters": [3, 3, 3], "table_offset": bneck.tables.offset},
        "coder": "constriction.stream.queue.RangeEncoder, Categorical(perfect=False) per channel",
        "sha256": {EDGE_FILE: _sha256(out / EDGE_FILE), CLOUD_FILE: _sha256(out / CLOUD_FILE)},
        "training": bneck.history,
    }
    (out / DESCRIPTION).write_text(json.dumps(desc, indent=1))
    return desc


def read_description(directory: str | Path) -> dict[str, Any]:
    """The JSON description, checked for its format (ValueError names what is wrong)."""
    path = Path(directory) / DESCRIPTION
    if not path.is_file():
        raise ValueError(f"bottleneck: no {DESCRIPTION} in {directory}")
    if path.stat().st_size > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"bottleneck: {path} is larger than {MAX_DESCRIPTION_BYTES} bytes")
    try:
        desc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"bottleneck: {path} is not JSON ({exc})") from exc
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise ValueError(f"bottleneck.format: {path} is not a {FORMAT} description")
    return desc


def load(directory: str | Path, part: str = "both") -> Bottleneck:
    """Rebuild a bottleneck from its files (safetensors only: no pickle, no code).

    ``part`` is ``"edge"`` (encoder and tables), ``"cloud"`` (decoder, prior, tables) or
    ``"both"``; the part not loaded keeps its freshly initialised weights.

    Raises:
        ValueError: a missing file, a sha256 that does not match the description, or weights that
            do not fit the described architecture.
    """
    if part not in ("edge", "cloud", "both"):
        raise ValueError(f"part: {part!r} is not edge, cloud or both")
    d = Path(directory)
    desc = read_description(d)
    arch = desc.get("architecture", {})
    try:
        config = BottleneckConfig(
            channels=arch["channels"],
            latent=arch["latent"],
            hidden=arch["hidden"],
            stride=arch["stride"],
            kind=arch.get("kind", "conv"),  # descriptions before the affine kind are conv ones
        )
        feature_shape = tuple(int(v) for v in desc["feature_shape"])
        cut = (int(desc["cut"]["index"]), str(desc["cut"]["name"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bottleneck.architecture: incomplete description ({exc})") from exc
    if len(feature_shape) != 3 or feature_shape[0] != config.channels:
        raise ValueError(f"bottleneck.feature_shape: {list(feature_shape)} does not fit {config.channels} channels")
    encoder, decoder = make_modules(config)
    prior = FactorizedPrior(config.latent)
    pmf = None
    names = [EDGE_FILE] if part == "edge" else [CLOUD_FILE] if part == "cloud" else [EDGE_FILE, CLOUD_FILE]
    for name in names:
        path = d / name
        if not path.is_file():
            raise ValueError(f"bottleneck: {name} is missing from {d}")
        if _sha256(path) != desc.get("sha256", {}).get(name):
            raise ValueError(f"bottleneck.sha256: {name} does not match its description")
        tensors = load_file(str(path))
        pmf = tensors.pop("pmf", None)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            prefix, _, rest = key.partition(".")
            groups.setdefault(prefix, {})[rest] = value
        modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
        for prefix, state in groups.items():
            if config.kind == "conv" and prefix in ("encoder", "decoder"):  # written before the step was a buffer
                state.setdefault("scale", torch.ones(()))
            if config.kind == "affine" and prefix in ("encoder", "decoder"):  # written before the dead zone: none
                state.setdefault("dead_zone", torch.zeros(()))
            if prefix not in modules:
                raise ValueError(f"bottleneck: {name} holds unexpected tensors {prefix}.*")
            try:
                modules[prefix].load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"bottleneck: {name} does not fit the architecture ({exc})") from exc
    if pmf is None:
        raise ValueError("bottleneck: the weights hold no coder tables (pmf)")
    tables = EntropyTables(pmf=pmf.double().numpy(), offset=int(desc.get("prior", {}).get("table_offset", 0)))
    if tables.channels != config.latent:
        raise ValueError(f"bottleneck.pmf: {tables.channels} tables for {config.latent} latent channels")
    for m in (encoder, decoder, prior):
        m.eval()
    return Bottleneck(config, feature_shape, encoder, decoder, prior, tables, cut, desc.get("training", {}))


def fingerprint(directory: str | Path) -> str:
    """SHA-256 over the description's base, cut and architecture and both weight files' hashes."""
    desc = read_description(directory)
    keyed = {k: desc.get(k) for k in ("format", "base", "cut", "architecture", "feature_shape", "prior", "sha256")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
