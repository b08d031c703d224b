"""Trace a model into a torch.fx graph, list its cuts, and split it into head and tail.

A *cut* ``k`` puts nodes ``0..k`` of the traced graph on the edge (the *head*) and the
remaining nodes in the cloud (the *tail*). What crosses the link is the cut's *live set*:
every value produced at or before ``k`` that a node after ``k`` reads, the graph input
included. Because the live set may hold several values, residual and concat models (ResNet,
GoogLeNet, DenseNet) split anywhere, not only between their top-level layers.

The contract that the rest of Cleave builds on::

    graph = trace(model, x)
    head, tail = graph.split(k)
    tail(*head(x))  # equals model(x) exactly, in float32, for every k in graph.cuts

Head and tail run the very same nodes, in the same order, on the same (shared) submodules
as the traced model, so nothing is re-associated and results are bit-identical.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import os
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from partitioner.vision import torchvision  # not `import torchvision`: see partitioner.vision

__all__ = ["Cut", "ModelGraph", "NotACut", "TraceError", "trace"]

# How many submodules may be made opaque, one per failed attempt, before giving up.
_MAX_LEAF_RETRIES = 32


class TraceError(ValueError):
    """A model could not be turned into a splittable graph.

    The message names the module path, node or construct that failed. A ValueError: the model or its
    input shape, as given, is what is wrong, and the daemons and the CLI report a ValueError in one
    line (as a TraceError, a wrong ``--input-shape`` stopped each of them with two tracebacks).
    """


@dataclass(frozen=True)
class Cut:
    """One place where a model can be split between edge and cloud.

    Attributes:
        index: position ``k`` of the node in the traced graph's node list (0 is the input
            placeholder). Cut ``k`` puts nodes ``0..k`` on the edge.
        name: the fx node name.
        op: the fx op of node ``k`` (``placeholder``, ``call_module``, ``call_function``
            or ``call_method``).
        target: readable target: a module's qualified name, a function's dotted name or a
            method name.
        live: names of the values produced at or before ``k`` and read after it (the graph
            input included), in node order. The head returns them in this order and the
            tail takes them in this order.
        shapes: the shape of each live value at the example input.
        dtypes: the dtype of each live value, e.g. ``"float32"``.
        nbytes: bytes that cross the link when the live values are sent as float32.
        recomputed: names of the non-tensor values (ints, ``torch.Size``, tuples of ints from
            ``x.size(0)``, ``x.shape``...) that are alive at the cut but do not cross: the tail
            recomputes them from the tensors that do, see :class:`ModelGraph`.
    """

    index: int
    name: str
    op: str
    target: str
    live: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    nbytes: int
    recomputed: tuple[str, ...] = ()


@dataclass(frozen=True)
class NotACut:
    """A node of the traced graph that is not a cut, and why (see :meth:`ModelGraph.not_cuts`)."""

    index: int
    name: str
    op: str
    target: str
    reason: str


class ModelGraph:
    """A traced model with its valid cuts; :meth:`split` turns a cut into head and tail.

    Build one with :func:`trace`. ``cuts`` lists every valid cut in topological order. A node
    is *not* a cut when it is a ``get_attr`` (the tail reads attributes itself), the output
    node, or when its live set holds a value that is not a tensor and cannot be recomputed
    (a tuple from ``torch.split``, ``None``): such values never go on the wire.

    Shape arithmetic does not block a cut: a non-tensor value built only from shape queries
    (``x.size(0)``, ``x.shape``, ``x.dim()``) and integer arithmetic on them is recomputed by
    the tail. A query on a tensor that crosses is re-run on it; a query on one that does not
    (``bs = inputs.size(0)`` long after the input is gone) is re-run on a crossing tensor that
    gives the same answer at two batch sizes (so the batch size of ``bs`` follows the batch the
    tail really gets). :meth:`not_cuts` lists the nodes that remain refused, with the reason.

    An *opaque* graph stands for a model that fx cannot look into (TorchScript). It has
    exactly two cuts: the input (index 0: everything runs in the cloud) and the output
    (index 1, named ``"output"``: everything runs on the edge). The output cut is present
    only when the model returns a single tensor.

    Head and tail modules share submodules and parameters with :attr:`module`; they are
    built on first use and cached per cut.

    Attributes:
        module: the traced ``fx.GraphModule``, or the TorchScript module itself when opaque.
        example_input: the input the cuts' shapes were measured at.
        cuts: every valid cut, in topological order.
        output_shapes: shapes of the tensors in the model's output, in structure order.
        opaque: True when the model could not be looked into (TorchScript).
    """

    def __init__(
        self,
        module: nn.Module,
        example_input: torch.Tensor,
        cuts: list[Cut],
        output_shapes: tuple[tuple[int, ...], ...],
        *,
        opaque: bool = False,
        rejected: dict[int | str, str] | None = None,
        not_cuts: list[NotACut] | None = None,
        recompute: dict[int, dict[str, str]] | None = None,
    ) -> None:
        self.module = module
        self.example_input = example_input
        self.cuts = cuts
        self.output_shapes = output_shapes
        self.opaque = opaque
        self._by_index = {c.index: c for c in cuts}
        self._by_name = {c.name: c for c in cuts}
        # Why a node that exists is not a cut, keyed by index and by name, for error messages.
        self._rejected = dict(rejected or {})
        self._not_cuts = list(not_cuts or [])
        # Per cut: the shape queries of the recomputed values that run on a stand-in tensor
        # (query node name -> crossing tensor name).
        self._recompute = dict(recompute or {})
        self._nodes: list[fx.Node] = [] if opaque else list(module.graph.nodes)  # type: ignore[union-attr]
        self._position = {node: i for i, node in enumerate(self._nodes)}
        self._node_named = {node.name: node for node in self._nodes}
        self._splits: dict[int, tuple[nn.Module, nn.Module]] = {}
        self._lock = threading.Lock()

    @property
    def output_nbytes(self) -> int:
        """Bytes of the model's output when sent as float32 (the downlink of a split)."""
        return sum(math.prod(s) * 4 for s in self.output_shapes)

    def cut(self, key: int | str | Cut) -> Cut:
        """Look a cut up by index, by node name, or check that a :class:`Cut` is one of ours.

        Raises:
            KeyError: naming the key, why it is not a cut when the node exists, and a few
                valid cuts.
        """
        found: Cut | None
        if isinstance(key, Cut):
            found = key if self._by_index.get(key.index) == key else None
        elif isinstance(key, int) and not isinstance(key, bool):
            found = self._by_index.get(key)
        elif isinstance(key, str):
            found = self._by_name.get(key)
        else:
            raise KeyError(f"cut key must be an int, a str or a Cut, got {type(key).__name__}")
        if found is not None:
            return found
        shown = key.name if isinstance(key, Cut) else key
        problem = self._rejected.get(shown) or f"no cut {shown!r}"
        sample = ", ".join(f"{c.index} ({c.name!r})" for c in _spread(self.cuts, 6))
        raise KeyError(f"{problem}; valid cuts include {sample}")

    def not_cuts(self) -> list[NotACut]:
        """Every node before the output that is not a cut, in node order, with the reason."""
        return list(self._not_cuts)

    def split(self, key: int | str | Cut) -> tuple[nn.Module, nn.Module]:
        """Return ``(head, tail)`` for a cut.

        ``head(x)`` returns a tuple of the live values in ``Cut.live`` order (always a tuple,
        even of one); ``tail(*head(x))`` returns the model's output, with the same structure
        (tensor, tuple, dict or namedtuple) as the model.
        """
        cut = self.cut(key)
        with self._lock:
            pair = self._splits.get(cut.index)
            if pair is None:
                pair = _split_opaque(self.module, cut) if self.opaque else self._split_fx(cut)
                self._splits[cut.index] = pair
        return pair

    def _split_fx(self, cut: Cut) -> tuple[fx.GraphModule, fx.GraphModule]:
        gm = self.module
        assert isinstance(gm, fx.GraphModule)
        nodes, k = self._nodes, cut.index
        live = [self._node_named[name] for name in cut.live]

        head = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in nodes[: k + 1]:
            env[node] = head.node_copy(node, env.__getitem__)
        head.output(tuple(env[node] for node in live))

        tail = fx.Graph()
        env = {}
        for node in live:
            env[node] = tail.placeholder(node.name)
            env[node].meta = dict(node.meta)
        for node in nodes[: k + 1]:
            # Attributes are re-read on the tail side rather than sent over the link.
            if node.op == "get_attr" and any(self._position[u] > k for u in node.users):
                env[node] = tail.node_copy(node)
        # Shape arithmetic is recomputed from the tensors that cross (in node order, so that
        # every value a recomputed node reads is already there).
        stand_in = self._recompute.get(k, {})
        recomputed = set(_recompute_closure([self._node_named[n] for n in cut.recomputed]))
        for node in nodes[: k + 1]:
            if node not in recomputed:
                continue
            if node.name in stand_in:
                source = node.args[0]
                substitute = env[self._node_named[stand_in[node.name]]]
                env[node] = tail.node_copy(node, lambda a, s=source, t=substitute: t if a is s else env[a])
            else:
                env[node] = tail.node_copy(node, env.__getitem__)
        for node in nodes[k + 1 :]:
            env[node] = tail.node_copy(node, env.__getitem__)

        # root=gm shares the referenced submodules and tensors instead of copying them.
        name = type(gm).__name__
        return (
            fx.GraphModule(gm, head, f"{name}Head").eval(),
            fx.GraphModule(gm, tail, f"{name}Tail").eval(),
        )


def trace(model: nn.Module, example_input: torch.Tensor) -> ModelGraph:
    """Trace ``model`` with torch.fx and find every valid cut at ``example_input``.

    The model is put in eval mode. When tracing fails inside a submodule (data-dependent
    control flow, say), that submodule is made a leaf (one opaque ``call_module`` node) and
    tracing is retried, up to 32 times. Extra ``forward`` parameters with defaults are
    specialised to their defaults.

    TorchScript modules cannot be fx-traced; they give an opaque graph with two cuts, see
    :class:`ModelGraph`.

    Raises:
        TraceError: the root module's own ``forward`` cannot be traced, or the traced graph
            fails on ``example_input``. The message names the module path, node or
            source line and the original error.
    """
    _to_eval(model)
    if isinstance(model, torch.jit.ScriptModule):
        return _trace_opaque(model, example_input)
    gm = _trace_fx(model)
    output = _propagate(gm, example_input)
    nodes = list(gm.graph.nodes)
    found = _find_cuts(nodes, lambda: _shapes_at_another_batch(gm, example_input))
    return ModelGraph(
        gm,
        example_input,
        found.cuts,
        _tensor_shapes(output),
        rejected=found.rejected,
        not_cuts=found.not_cuts,
        recompute=found.recompute,
    )


class _LeafRetryTracer(fx.Tracer):
    """An fx tracer that treats chosen submodule paths as leaves and remembers which
    submodule a tracing error came from.

    torchvision's ``NodePathTracer`` tracks module paths too, but to name nodes for feature
    extraction; we need the path of the module that *raised*, and leaves chosen by path.
    Like torchvision's feature extractor we autowrap ``torchvision.ops`` functions, but we do
    not make every ``torchvision.ops`` module a leaf: that would hide the cut points inside
    ``Conv2dNormActivation`` and ``SqueezeExcitation`` blocks.
    """

    def __init__(self, leaf_paths: frozenset[str]) -> None:
        super().__init__(autowrap_modules=(math, torchvision.ops))
        self.leaf_paths = leaf_paths
        self.failure: tuple[BaseException, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_paths or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # The innermost module sees the error first; its callers must not overwrite it.
            if self.failure is None or self.failure[0] is not e:
                # A module that is not registered under the root cannot be named: blame its caller.
                with contextlib.suppress(NameError):
                    self.failure = (e, self.path_of_module(m))
            raise


def _trace_fx(model: nn.Module) -> fx.GraphModule:
    concrete_args = _concrete_args(model)
    leaves: set[str] = set()
    while True:  # each pass makes one more submodule a leaf, or raises
        tracer = _LeafRetryTracer(frozenset(leaves))
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:
            failed = tracer.failure
            path = failed[1] if failed is not None and failed[0] is e else ""
            if not path or path in leaves or len(leaves) == _MAX_LEAF_RETRIES:
                raise TraceError(_describe_failure(model, path, e, leaves)) from e
            leaves.add(path)
            continue
        return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _concrete_args(model: nn.Module) -> dict[str, Any] | None:
    """Pin every ``forward`` parameter after the input to its default.

    Without this fx would pass a proxy for ``mask=None`` and take the ``mask is not None``
    branch, which then fails at run time.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    extras = [p for p in params[1:] if p.kind not in variadic]
    required = [p.name for p in extras if p.default is inspect.Parameter.empty]
    if required:
        raise TraceError(
            f"cannot trace {type(model).__name__}: forward needs inputs besides the first "
            f"({', '.join(required)}); only single-input models can be split"
        )
    return {p.name: p.default for p in extras} or None


def _describe_failure(model: nn.Module, path: str, error: Exception, leaves: Iterable[str]) -> str:
    where = repr(path) if path else f"the root module ({type(model).__name__}.forward)"
    message = f"cannot trace {where} ({type(error).__name__}: {error})"
    line = _user_source_line(error)
    if line:
        message += f" at {line}"
    if leaves:
        message += f"; already made opaque: {', '.join(sorted(leaves))}"
    return message


def _user_source_line(error: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the model's own line that failed."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return None
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"


class _ShapeProp(fx.Interpreter):
    """torch's ShapeProp without fake tensors, naming the node the example input makes fail.

    Each node's ``meta`` gets what ShapeProp records: ``tensor_meta`` (shape, dtype, ...) and ``type``.
    ShapeProp itself imports torch's symbolic-shape machinery (and so sympy) on its first node, for
    fake tensors this never runs: half a second of every model load, most of it sympy.
    """

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise TraceError(
                f"traced graph fails on the example input at node {n.name!r} "
                f"({n.format_node()}): {type(e).__name__}: {e}"
            ) from e
        found = False

        def metadata(value: Any) -> Any:
            nonlocal found
            if not isinstance(value, torch.Tensor):
                return value
            found = True
            return _tensor_metadata(value)

        meta = fx.node.map_aggregate(result, metadata)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """ShapeProp's record of ``t``, found without ``torch._check`` (which imports the symbolic-shape
    machinery) for the dense, unquantized tensors of a model's forward; others as ShapeProp finds them."""
    if t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    formats = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    dims = {torch.contiguous_format: t.dim(), torch.channels_last: 4, torch.channels_last_3d: 5}
    memory_format = next((f for f in formats if t.dim() == dims[f] and t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def _propagate(gm: fx.GraphModule, example_input: torch.Tensor) -> Any:
    """Record shape, dtype and Python type of every node's value at the example input."""
    with torch.no_grad():
        # clone: an in-place op on the input must not alter the caller's tensor.
        try:
            return _ShapeProp(gm).run(example_input.clone())
        except TraceError as exc:
            # torch's Interpreter appends "While executing <node> ... Original traceback: None / Use
            # tlparse ..." to the message: five lines of noise after the one that names the node.
            raise TraceError(str(exc).split("\n\nWhile executing ", 1)[0]) from exc.__cause__


@dataclass
class _Found:
    cuts: list[Cut]
    rejected: dict[int | str, str]
    not_cuts: list[NotACut]
    recompute: dict[int, dict[str, str]]


def _find_cuts(nodes: list[fx.Node], other_batch: Any = None) -> _Found:
    """Every cut of the graph. ``other_batch()`` gives tensor shapes at a second batch size
    (called at most once, only when a shape query needs a stand-in tensor)."""
    position = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((position[u] for u in node.users), default=-1) for node in nodes}
    pure = _shape_arithmetic(nodes)
    shapes_b: list[dict[str, tuple[int, ...]] | None] = []
    found = _Found([], {}, [], {})
    live: list[fx.Node] = []
    for k, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "get_attr":
            live.append(node)
        live = [n for n in live if last_use[n] > k]
        reason = None
        tensors = [n for n in live if _holds_tensor(n)]
        others = [n for n in live if not _holds_tensor(n)]
        stand_in: dict[str, str] = {}
        if node.op == "get_attr":
            reason = "get_attr nodes are not cut points (the tail reads attributes itself)"
        elif bad := [n for n in others if n not in pure]:
            kinds = ", ".join(f"{n.name}: {_type_name(n)}" for n in bad)
            reason = f"its live set holds values that are not tensors and are not shape arithmetic ({kinds})"
        elif others:
            if not shapes_b:
                shapes_b.append(_call_quietly(other_batch))
            problem = _stand_ins(others, tensors, shapes_b[0], stand_in)
            if problem:
                reason = problem
        if reason is not None:
            message = f"node {k} ({node.name!r}) is not a cut: {reason}"
            found.rejected[k] = found.rejected[node.name] = message
            found.not_cuts.append(NotACut(k, node.name, node.op, _target_name(node), reason))
            continue
        if stand_in:
            found.recompute[k] = stand_in
        metas = [n.meta["tensor_meta"] for n in tensors]
        shapes = tuple(tuple(int(d) for d in m.shape) for m in metas)
        found.cuts.append(
            Cut(
                index=k,
                name=node.name,
                op=node.op,
                target=_target_name(node),
                live=tuple(n.name for n in tensors),
                shapes=shapes,
                dtypes=tuple(_dtype_name(m.dtype) for m in metas),
                nbytes=sum(math.prod(s) * 4 for s in shapes),
                recomputed=tuple(n.name for n in others),
            )
        )
    return found


# Shape arithmetic: values the tail can recompute instead of receiving.

_QUERY_METHODS = frozenset({"size", "dim"})
_QUERY_ATTRS = frozenset({"shape", "ndim"})
_INT_FUNCTIONS = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.mod,
        operator.neg,
        operator.truediv,
        int,
        len,
    }
)
_SHAPE_TYPES = (int, float, bool, torch.Size, tuple, list)


def _is_query(node: fx.Node) -> bool:
    """``t.size(...)``, ``t.dim()``, ``t.shape`` or ``t.ndim`` of a tensor node ``t``."""
    if not node.args or not isinstance(node.args[0], fx.Node) or not _holds_tensor(node.args[0]):
        return False
    if node.op == "call_method" and node.target in _QUERY_METHODS:
        return all(not isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values()))
    return (
        node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in _QUERY_ATTRS
    )


def _shape_arithmetic(nodes: list[fx.Node]) -> set[fx.Node]:
    """Non-tensor nodes computed only from shape queries, constants and integer arithmetic."""
    pure: set[fx.Node] = set()
    for node in nodes:
        kind = node.meta.get("type")
        if _holds_tensor(node) or not (isinstance(kind, type) and issubclass(kind, _SHAPE_TYPES)):
            continue
        if _is_query(node):
            pure.add(node)
        elif node.op == "call_function" and node.target in _INT_FUNCTIONS:
            inputs = node.all_input_nodes
            if all(n in pure for n in inputs):
                pure.add(node)
    return pure


def _recompute_closure(values: list[fx.Node]) -> list[fx.Node]:
    """The shape-arithmetic nodes ``values`` are computed from, themselves included."""
    seen: set[fx.Node] = set()
    stack = list(values)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not _is_query(node):
            stack.extend(node.all_input_nodes)
    return list(seen)


def _stand_ins(
    values: list[fx.Node],
    crossing: list[fx.Node],
    other_shapes: dict[str, tuple[int, ...]] | None,
    out: dict[str, str],
) -> str | None:
    """Fill ``out`` (query name -> crossing tensor name) for every shape query of ``values`` whose
    tensor does not cross; return why that is impossible, or None."""
    for query in _recompute_closure(values):
        if not _is_query(query):
            continue
        source = query.args[0]
        if source in crossing:
            continue
        substitute = next(
            (t for t in crossing if _same_answer(query, source, t, other_shapes)),
            None,
        )
        if substitute is None:
            return (
                f"shape value {query.name!r} ({query.format_node()}) reads {source.name!r}, which does not "
                "cross, and no crossing tensor gives the same answer at two batch sizes"
            )
        out[query.name] = substitute.name
    return None


def _same_answer(
    query: fx.Node, source: fx.Node, candidate: fx.Node, other_shapes: dict[str, tuple[int, ...]] | None
) -> bool:
    """Whether ``query`` run on ``candidate`` answers as on ``source``, at the example batch size
    and at another one (without the second, a coincidence at batch 1 would pass)."""
    if other_shapes is None or source.name not in other_shapes or candidate.name not in other_shapes:
        return False
    pairs = [
        (tuple(source.meta["tensor_meta"].shape), tuple(candidate.meta["tensor_meta"].shape)),
        (other_shapes[source.name], other_shapes[candidate.name]),
    ]
    return all(_query_value(query, a) == _query_value(query, b) for a, b in pairs)


def _query_value(query: fx.Node, shape: tuple[int, ...]) -> Any:
    if query.op == "call_function":  # getattr(t, "shape" | "ndim")
        return tuple(shape) if query.args[1] == "shape" else len(shape)
    if query.target == "dim":
        return len(shape)
    dim = query.args[1] if len(query.args) > 1 else query.kwargs.get("dim")
    if dim is None:
        return tuple(shape)
    try:
        return shape[dim]
    except (IndexError, TypeError):
        return None


def _shapes_at_another_batch(gm: fx.GraphModule, example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor node when the example input is repeated to another batch size."""
    batch = int(example_input.shape[0]) if example_input.dim() else 1
    bigger = torch.cat([example_input] * (2 if batch > 1 else 3)) if example_input.dim() else example_input
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if isinstance(value, torch.Tensor):
                shapes[n.name] = tuple(value.shape)
            return value

    with torch.no_grad():
        Recorder(gm).run(bigger.clone())
    return shapes


def _call_quietly(fn: Any) -> Any:
    """``fn()``, or None when there is no ``fn`` or it fails (a model that only runs at one batch size)."""
    if fn is None:
        return None
    try:
        return fn()
    except Exception:
        return None


def _holds_tensor(node: fx.Node) -> bool:
    kind = node.meta.get("type")
    return isinstance(kind, type) and issubclass(kind, torch.Tensor) and "tensor_meta" in node.meta


def _type_name(node: fx.Node) -> str:
    kind = node.meta.get("type")
    return kind.__name__ if isinstance(kind, type) else "unknown"


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):  # placeholder, call_module, call_method, get_attr
        return node.target
    module = getattr(node.target, "__module__", None) or ""
    module = {"_operator": "operator"}.get(module, module)
    name = getattr(node.target, "__name__", repr(node.target))
    return f"{module}.{name}" if module else name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of the tensors in a (possibly nested) output, in structure order."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape),)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return tuple(s for v in value for s in _tensor_shapes(v))
    return ()


def _to_eval(model: nn.Module) -> None:
    # Modules from torch.export refuse eval(): their mode was fixed at export time.
    with contextlib.suppress(NotImplementedError):
        model.eval()


def _spread(items: list[Cut], n: int) -> list[Cut]:
    """Up to n items evenly spread over the list, first and last included."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


# Opaque (TorchScript) models.


class _Tupled(nn.Module):
    """Calls a module and returns its result as a 1-tuple: the head's calling convention."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.inner(x),)


def _trace_opaque(module: nn.Module, example_input: torch.Tensor) -> ModelGraph:
    with torch.no_grad():
        output = module(example_input.clone())
    try:
        arg = module.forward.schema.arguments[1].name  # type: ignore[union-attr]
    except (AttributeError, IndexError):
        arg = "input"
    target = getattr(module, "original_name", type(module).__name__)
    cuts = [_tensor_cut(0, arg, "placeholder", arg, example_input)]
    rejected: dict[int | str, str] = {}
    not_cuts = []
    if isinstance(output, torch.Tensor):
        cuts.append(_tensor_cut(1, "output", "call_module", target, output))
    else:
        reason = f"the model returns {type(output).__name__}, not a tensor"
        rejected[1] = rejected["output"] = f"node 1 ('output') is not a cut: {reason}"
        not_cuts.append(NotACut(1, "output", "call_module", target, reason))
    return ModelGraph(
        module, example_input, cuts, _tensor_shapes(output), opaque=True, rejected=rejected, not_cuts=not_cuts
    )


def _tensor_cut(index: int, name: str, op: str, target: str, value: torch.Tensor) -> Cut:
    shape = tuple(value.shape)
    return Cut(index, name, op, target, (name,), (shape,), (_dtype_name(value.dtype),), math.prod(shape) * 4)


def _split_opaque(module: nn.Module, cut: Cut) -> tuple[nn.Module, nn.Module]:
    if cut.index == 0:
        return _Tupled(nn.Identity()), module
    return _Tupled(module), nn.Identity()
