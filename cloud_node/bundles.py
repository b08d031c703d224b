"""The edge bundles this cloud hands out (``bundles.dir`` in cloud.yaml; ``GetBundle``).

:class:`BundleStore` opens ``DIR/<model>`` for every served model that has one, at start (a
directory that names no served model is logged as a warning, not handed out):
:meth:`EdgeBundle.open` checks every file's size and sha256, and a bundle whose fingerprint is not
the served model's is refused (the daemon does not start), so the cloud never hands out a bundle
its own sessions would refuse. Immutable after construction: no lock needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from partitioner.bundle import BundleError, EdgeBundle
from partitioner.bundle_wire import bundle_chunks
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

BUNDLES_OFF = "bundles are off on this cloud: set bundles.dir in cloud.yaml (a directory of `cleave bundle` outputs)"


class BundleStore:
    """Verified bundles by model name; ``root`` None: bundles are off."""

    def __init__(self, root: str | Path | None, fingerprints: Mapping[str, str]) -> None:
        """``fingerprints``: served model name -> its fingerprint. ValueError naming a bad bundle."""
        self.root = Path(root) if root else None
        self.bundles: dict[str, EdgeBundle] = {}
        self.unserved: list[str] = []  # directories under root that no served model names
        if self.root is None:
            return
        if not self.root.is_dir():
            raise ValueError(f"bundles.dir: {self.root} is not a directory")
        for name, fingerprint in fingerprints.items():
            path = self.root / name
            if not path.is_dir():
                continue
            try:
                bundle = EdgeBundle.open(path, expect_fingerprint=fingerprint)
            except BundleError as exc:
                raise ValueError(f"bundles.dir: the bundle of {name!r} is refused: {exc}") from None
            if bundle.manifest.name != name:
                raise ValueError(f"bundles.dir: {path} holds {bundle.manifest.name!r}, not {name!r}")
            self.bundles[name] = bundle
            log.info("bundle %s (%s, %d bytes) from %s", name, fingerprint[:12], bundle.size_bytes, path)
        self.unserved = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name not in fingerprints)
        if self.unserved:  # most likely a typo in a model name: say so rather than answer NotFound later
            log.warning(
                "bundles.dir: %s not handed out: no served model has that name (served: %s)",
                ", ".join(self.unserved),
                ", ".join(sorted(fingerprints)) or "none",
            )

    def chunks(self, model: str, chunk_bytes: int) -> Iterator[si_pb2.BundleChunk]:
        """``model``'s bundle as ``GetBundle`` messages; FailedPrecondition when off, NotFound without one."""
        if self.root is None:
            raise FailedPrecondition(BUNDLES_OFF)
        bundle = self.bundles.get(model)
        if bundle is None:
            raise NotFound(
                f"model: no bundle of {model!r} on this cloud (bundles.dir {self.root} has no valid {model}/)"
            )
        return bundle_chunks(bundle, chunk_bytes)
