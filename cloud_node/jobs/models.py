"""Turning a job's ``ModelRef`` (or an upload) into a module and an example input.

Runs in the job's worker process (inside its sandbox). Uploaded TorchScript and ``.pt2`` files
load as they are (only when ``jobs.allow_code_uploads`` let them in); a safetensors upload is a
state dict for an architecture named in its upload header, loaded into a freshly built module
(weights only, never pickle). The architecture is a torchvision name or a Transformer family,
never a path or a ``module:function`` factory. :func:`check_state_dict` is what the daemon runs at
upload: it builds the architecture on the ``meta`` device (no memory) and compares shapes and
dtypes with the safetensors header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.offline.transformer import FAMILIES, build_transformer, family_of
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


MAX_CONFIG_VALUE = 1 << 20  # any number in a Transformer config
MAX_LAYERS = 128  # num_hidden_layers / n_layer / n_layers
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers")
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
}


def check_architecture(arch: str, field: str = "header.architecture") -> None:
    """Only a torchvision model name, a pretrained model an installed package ships
    (:data:`partitioner.spec.PRETRAINED_SOURCES`) or a supported Transformer family: never a path or a factory."""
    import torchvision

    from partitioner.spec import PRETRAINED_SOURCES

    if (
        arch in FAMILIES
        or arch in PRETRAINED_SOURCES
        or (arch.isidentifier() and arch in torchvision.models.list_models())
    ):
        return
    raise ValueError(f"{field}: {arch[:100]!r} is not a torchvision model name or one of {', '.join(FAMILIES)}")


def check_config(config: Any, field: str) -> None:
    """A Transformer config a client sends: a flat mapping of small values."""
    if not isinstance(config, dict):
        raise ValueError(f"{field}: not a JSON object")
    for key, value in config.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int | float):
            if not abs(value) <= MAX_CONFIG_VALUE:
                raise ValueError(f"{field}.{str(key)[:60]}: {value} is over {MAX_CONFIG_VALUE}")
            if key in _LAYER_KEYS and value > MAX_LAYERS:
                raise ValueError(f"{field}.{key}: {value} layers is over {MAX_LAYERS}")
            continue
        raise ValueError(f"{field}.{str(key)[:60]}: only numbers, strings and booleans are accepted")


def check_state_dict(meta: dict[str, Any], declared: dict[str, Any]) -> nn.Module:
    """Build the upload's architecture on the meta device and check the declared tensors fit it.

    ``declared`` maps names to :class:`~.headers.TensorInfo` (dtype name, shape). Returns the meta
    module (for :func:`kind_of`). Raises ValueError naming the field.
    """
    arch = meta.get("architecture", "")
    check_architecture(arch)
    config = json.loads(meta.get("config_json") or "{}")
    check_config(config, "header.config_json")
    source = ModelSource(upload_format="SAFETENSORS", upload_meta=meta)
    with torch.device("meta"):
        model, _ = _build(source, arch, config, meta)
    state = model.state_dict()
    missing = sorted(set(state) - set(declared))
    unexpected = sorted(set(declared) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"header.architecture: the state dict does not fit {arch!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    classifier = list(state)[-2:]  # the last layer's weight and bias: its rows are the classes
    for name, tensor in state.items():
        info = declared[name]
        if tuple(tensor.shape) != tuple(info.shape) or _ST_DTYPES.get(tensor.dtype) != info.dtype:
            other_classes = name in classifier and tuple(info.shape[1:]) == tuple(tensor.shape[1:])
            raise ValueError(
                f"header.architecture: {name} is {info.dtype}{list(info.shape)} in the file, "
                f"{arch!r} needs {_ST_DTYPES.get(tensor.dtype, tensor.dtype)}{list(tensor.shape)}"
                + (
                    f" (a classifier of {info.shape[0]} classes: header.num_classes, --num-classes)"
                    if other_classes
                    else ""
                )
            )
    return model


def _build(source: ModelSource, arch: str, config: dict[str, Any], meta: dict[str, Any]) -> tuple[nn.Module, tuple]:
    shape = source.input_shape or tuple(meta.get("input_shape") or ())
    num_classes = source.num_classes or meta.get("num_classes") or None
    if arch in FAMILIES:
        return build_transformer(arch, config, source.seed), shape
    spec = ModelSpec(arch, arch, input_shape=shape or DEFAULT_IMAGE_SHAPE, num_classes=num_classes, seed=source.seed)
    return load_model(spec), shape


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
    check_architecture(arch, "model")
    model, shape = _build(source, arch, config, meta)
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
