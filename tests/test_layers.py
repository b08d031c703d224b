"""The import direction of DESIGN.md, checked on the source: a small AST walk, no import-linter.

Layers, lowest first: protos <- compressor <- partitioner <- runtime <- {edge_node, cloud_node} <-
cleave_cli. A module may import its own package and any lower layer, never a higher one; the two
daemons never import each other; no package imports ``tests`` or ``benchmarks``. Every import counts,
also one inside a function (a lazy import is still a dependency). The wire codec (``compressor``'s
top-level modules) imports without torch, which the light edge does not have.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.unit

#: Each package's layer; a module may import packages of a lower layer (and its own package).
LAYERS: dict[str, int] = {
    "protos": 0,
    "compressor": 1,
    "partitioner": 2,
    "runtime": 3,
    "edge_node": 4,
    "cloud_node": 4,
    "cleave_cli": 5,
}
#: Importable from the repository root, never from a package.
NOT_FOR_PACKAGES = ("tests", "benchmarks")
#: The torch side of the compression package; everything else in ``compressor`` is the wire codec.
CODEC_EXCEPT = "compressor.offline"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of the modules ``path`` (module ``name``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import mod`` may name a submodule: record it too (an over-approximation
            # that only ever adds edges inside the package ``target`` already names).
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def module_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every ``.py`` file of ``packages`` under ``root``."""
    graph: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            graph[name] = imports_of(path, name)
    return graph


def violations(graph: Mapping[str, Iterable[str]], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Every import in ``graph`` that goes against the layers, as ``"importer -> imported: why"``."""
    found = []
    for importer, imported in sorted(graph.items()):
        src = importer.split(".")[0]
        if src not in layers:
            continue
        reported: list[str] = []
        for target in sorted(set(imported)):
            dst = target.split(".")[0]
            if dst == src or any(target.startswith(r + ".") for r in reported):
                continue  # one line per import: ``from a import b`` also records ``a.b``
            if dst in NOT_FOR_PACKAGES:
                found.append(f"{importer} -> {target}: packages never import {dst}/")
                reported.append(target)
            elif dst in layers and layers[dst] >= layers[src]:
                why = "the daemons never import each other" if layers[dst] == layers[src] else f"{dst} is above {src}"
                found.append(f"{importer} -> {target}: {why}")
                reported.append(target)
    return found


def test_the_packages_import_downwards_only() -> None:
    graph = module_graph(ROOT, LAYERS)
    assert len(graph) > 100, "the walk found too few modules to be looking at the project"
    found = violations(graph)
    assert not found, "\n".join(found)


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    """A fake tree with one violation of each kind: the check must name every one of them."""
    files = {
        "protos/__init__.py": "",
        "protos/wire.py": "def f():\n    from partitioner.graph import trace  # lazy, still a dependency\n",
        "compressor/__init__.py": "from protos import wire\n",  # downwards: fine
        "partitioner/__init__.py": "",
        "partitioner/graph.py": "from . import x\nfrom .graph2 import y\n",  # its own package: fine
        "runtime/__init__.py": "",
        "runtime/serving.py": "import edge_node.main\n",
        "edge_node/__init__.py": "",
        "edge_node/main.py": "import cloud_node.sessions\nfrom runtime import serving\n",
        "cloud_node/__init__.py": "",
        "cloud_node/sessions.py": "from tests.support import harness\n",
        "cleave_cli/__init__.py": "",
        "cleave_cli/main.py": "import edge_node.main, cloud_node.sessions, runtime, protos\nimport benchmarks.netlab\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(module_graph(tmp_path, LAYERS))
    assert found == [
        "cleave_cli.main -> benchmarks.netlab: packages never import benchmarks/",
        "cloud_node.sessions -> tests.support: packages never import tests/",
        "edge_node.main -> cloud_node.sessions: the daemons never import each other",
        "protos.wire -> partitioner.graph: partitioner is above protos",
        "runtime.serving -> edge_node.main: edge_node is above runtime",
    ], found


def test_relative_imports_resolve_to_their_package(tmp_path: Path) -> None:
    (tmp_path / "runtime" / "sub").mkdir(parents=True)
    (tmp_path / "runtime" / "__init__.py").write_text("from .serving import Daemon\n")
    (tmp_path / "runtime" / "sub" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "sub" / "m.py").write_text("from ..serving import Daemon\nfrom .. import cloud\n")
    (tmp_path / "runtime" / "serving.py").write_text("from . import handlers\nfrom .handlers import kind\n")
    graph = module_graph(tmp_path, ["runtime"])
    assert "runtime.serving" in graph["runtime"]
    assert {"runtime", "runtime.handlers", "runtime.handlers.kind"} <= graph["runtime.serving"]
    assert {"runtime.serving", "runtime.cloud"} <= graph["runtime.sub.m"]


def codec_modules() -> list[str]:
    graph = module_graph(ROOT, ["compressor"])
    return sorted(m for m in graph if m != CODEC_EXCEPT and not m.startswith(CODEC_EXCEPT + "."))


@pytest.mark.parametrize("module", [*codec_modules(), *sorted(module_graph(ROOT, ["runtime"]))])
def test_every_codec_and_runtime_module_imports_without_torch(module: str) -> None:
    """Each in a fresh interpreter, so that one module's torch cannot hide behind another's import.

    The codec and the shared runtime are what an edge without torch runs on.
    """
    check = f"import sys, {module}; assert 'torch' not in sys.modules, 'imported torch'"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{module}: {done.stderr[-1500:]}"


def test_the_codec_list_is_the_codec() -> None:
    modules = codec_modules()
    assert {"compressor", "compressor.codec", "compressor.spec", "compressor.framing"} <= set(modules)
    assert not [m for m in modules if m.startswith("compressor.offline")]
