""":class:`ModelSpec`: how to obtain a served model, in a module that imports no torch.

The daemons parse their configuration, bind their port and report NOT_SERVING before they import
torch and load their models; the configuration carries ModelSpecs, so they live here.
:mod:`partitioner.models` builds models from them (and re-exports the class).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript", ".pt", ".jit")
_EXPORT_SUFFIX = ".pt2"
_ONNX_SUFFIX = ".onnx"
_FILE_SUFFIXES = (*_TORCHSCRIPT_SUFFIXES, _EXPORT_SUFFIX, _ONNX_SUFFIX)

#: Calibration sources besides a directory of images: the photos bundled with scikit-image and
#: scikit-learn (:mod:`partitioner.photos`), or synthetic images.
PHOTOS = "photos"
SYNTHETIC = "synthetic"
#: The files of a calibration directory that are read, by suffix (here, without torch, for config checks).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that a calibration directory reads (by :data:`IMAGE_SUFFIXES`), in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


#: Names of the pretrained models :data:`partitioner.models.PRETRAINED` builds (kept here, without torch).
PRETRAINED_SOURCES = frozenset({"efficientnet_lite0_pretrained"})


@dataclass(frozen=True)
class ModelSpec:
    """How to obtain one served model; edge and cloud configs carry the same spec.

    Attributes:
        name: the name the daemons serve the model under.
        source: one of
            ``"resnet18"`` or ``"torchvision:resnet18"``: a torchvision model, built with
            ``weights=None`` (nothing is downloaded);
            a TorchScript file (``.ts``, ``.torchscript``, ``.pt``, ``.jit``);
            a ``torch.export`` file (``.pt2``);
            an ONNX file (``.onnx``), from any framework (tf2onnx for TensorFlow/Keras), converted
            to an fx graph by onnx2torch (the ``onnx`` extra);
            a pretrained model that ships in an installed package, by name (see :data:`partitioner.models.PRETRAINED`:
            ``"efficientnet_lite0_pretrained"``, ImageNet weights, the ``pretrained`` extra);
            ``"package.module:function"``: a factory that returns an ``nn.Module``, called with
            ``factory_args`` (none by default), e.g. an architecture from an installed package
            (``efficientnet_lite_pytorch:EfficientNet.from_name`` with ``factory_args:
            [efficientnet-lite0]``) whose trained weights come from ``weights``. It comes from the
            daemon's own config only, never from a request, because importing it runs arbitrary code.
        weights: optional local state-dict file, loaded with ``weights_only=True`` (no pickled
            objects); ``.safetensors`` files need the ``safetensors`` package.
        input_shape: shape of one input batch, batch dimension included.
        num_classes: passed to torchvision builders when given.
        seed: seeds random initialisation, so that two processes building the same spec get
            identical weights.
        pruning_plan: optional JSON plan from the compression service (a CNN channel-pruning plan
            or a Transformer head/FFN plan), replayed on this copy of the original model after its
            weights are loaded: the edge gets the pruned model without downloading it.
        factory_args: positional arguments (strings, numbers, booleans) for a factory source.
        bottleneck: optional directory of a learned bottleneck's artifacts (``bottleneck.json`` and
            its safetensors, from a ``bottleneck`` compression job) trained on this model: it is
            inserted at its cut, and the cut ``bottleneck_latent`` sends its latent (encoding
            ``entropy``). See docs/bottleneck.md.
    """

    name: str
    source: str
    weights: str | None = None
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    num_classes: int | None = None
    seed: int = 0
    pruning_plan: str | None = None
    factory_args: tuple[str | int | float | bool, ...] = ()
    bottleneck: str | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__.
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if isinstance(self.input_shape, list):
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if isinstance(self.factory_args, list):
            object.__setattr__(self, "factory_args", tuple(self.factory_args))
        self._require("name", _is_nonempty_str(self.name), "a non-empty string")
        self._require("source", _is_nonempty_str(self.source), "a non-empty string")
        self._require("weights", self.weights is None or _is_nonempty_str(self.weights), "a file path")
        self._require(
            "input_shape",
            isinstance(self.input_shape, tuple)
            and len(self.input_shape) > 0
            and all(_is_int(d) and d > 0 for d in self.input_shape),
            "a list of positive integers",
        )
        self._require(
            "num_classes",
            self.num_classes is None or (_is_int(self.num_classes) and self.num_classes > 0),
            "a positive integer",
        )
        self._require("seed", _is_int(self.seed) and 0 <= self.seed < 2**63, "a non-negative integer")
        self._require("pruning_plan", self.pruning_plan is None or _is_nonempty_str(self.pruning_plan), "a file path")
        self._require("bottleneck", self.bottleneck is None or _is_nonempty_str(self.bottleneck), "a directory path")
        self._require(
            "factory_args",
            isinstance(self.factory_args, tuple)
            and all(isinstance(a, (str, int, float, bool)) for a in self.factory_args),
            "a list of strings, numbers or booleans",
        )
        self._require(
            "factory_args",
            not self.factory_args or (":" in self.source and not self.source.lower().endswith(_FILE_SUFFIXES)),
            "empty unless the source is a 'package.module:function' factory",
        )

    @property
    def pretrained(self) -> bool:
        """Whether the source is one of the :data:`partitioner.models.PRETRAINED` models (trained on real images)."""
        return self.source in PRETRAINED_SOURCES

    def _require(self, key: str, ok: bool, expected: str) -> None:
        if not ok:
            who = f"model {self.name!r}" if _is_nonempty_str(self.name) else "model spec"
            raise ValueError(f"{who}: key {key!r} must be {expected}, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from a parsed config mapping (YAML), validating keys and types.

        Raises:
            ValueError: naming the unknown, missing or mistyped key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"model spec must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(f"unknown key {key!r} in model spec (known keys: {', '.join(known)})")
        for key in ("name", "source"):
            if key not in d:
                raise ValueError(f"model spec is missing required key {key!r}")
        return cls(**d)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
