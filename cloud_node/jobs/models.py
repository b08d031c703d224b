"""Turning a job's ``ModelRef`` (or an upload) into a module and an example input.

Runs in the job's worker process. Uploaded TorchScript and ``.pt2`` files load as they are;
a safetensors upload is a state dict for an architecture named in its upload header, loaded
into a freshly built module (weights only, never pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.pruning.transformer import FAMILIES, build_transformer, family_of
from partitioner.models import ModelSpec, load_model

DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DEFAULT_TOKEN_SHAPE = (1, 32)


@dataclass
class ModelSource:
    """Plain (picklable) description of where the model comes from."""

    torchvision: str = ""
    transformer: str = ""
    config: dict[str, Any] | None = None
    upload_path: str = ""
    upload_format: str = ""
    upload_meta: dict[str, Any] | None = None
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    seed: int = 0


def load(source: ModelSource) -> tuple[nn.Module, Any]:
    """The module (eval mode) and an example input for it."""
    meta = source.upload_meta or {}
    arch = source.torchvision or source.transformer
    config = source.config or {}
    if source.upload_format in ("TORCHSCRIPT", "EXPORTED_PROGRAM"):
        if source.upload_format == "TORCHSCRIPT":
            model = torch.jit.load(source.upload_path, map_location="cpu")
        else:
            model = torch.export.load(source.upload_path).module()
        shape = source.input_shape or tuple(meta.get("input_shape") or DEFAULT_IMAGE_SHAPE)
        return model, _image_input(shape, source.seed)
    if source.upload_format == "SAFETENSORS":
        arch = meta.get("architecture", "")
        config = json.loads(meta.get("config_json") or "{}")
    shape = source.input_shape or tuple(meta.get("input_shape") or ())
    num_classes = source.num_classes or meta.get("num_classes") or None
    if arch in FAMILIES:
        model = build_transformer(arch, config, source.seed)
    else:
        spec = ModelSpec(
            arch, arch, input_shape=shape or DEFAULT_IMAGE_SHAPE, num_classes=num_classes, seed=source.seed
        )
        model = load_model(spec)
    if source.upload_format == "SAFETENSORS":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(source.upload_path), strict=True)
    model.eval()
    if arch in FAMILIES:
        vocab = int(model.config.vocab_size)
        gen = torch.Generator().manual_seed(source.seed)
        return model, {"input_ids": torch.randint(0, vocab, shape or DEFAULT_TOKEN_SHAPE, generator=gen)}
    return model, _image_input(shape or DEFAULT_IMAGE_SHAPE, source.seed)


def kind_of(model: nn.Module) -> str:
    """ "transformer" (a supported family), "cnn" (has 2-D convolutions) or "model"."""
    try:
        family_of(model)
        return "transformer"
    except ValueError:
        pass
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or getattr(m, "original_name", "") == "Conv2d":
            return "cnn"
    if isinstance(model, torch.fx.GraphModule) and any(
        "conv2d" in str(n.target) for n in model.graph.nodes if n.op == "call_function"
    ):
        return "cnn"
    return "model"


def _image_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
