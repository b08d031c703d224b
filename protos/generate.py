"""Regenerate the Python stubs from ``protos/cleave/v1/*.proto`` and ``protos/kserve/v2/*.proto`` (``make protos``).

Stubs are generated from the repository root so that their imports read
``from protos.cleave.v1 import ...``. Output depends on the grpcio-tools version, which the ``dev``
extra pins; ``tests/test_protos.py`` fails when the committed stubs differ from a fresh run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/cleave/v1")
# Cleave's own wire, and the KServe v2 Open Inference Protocol the cloud also serves.
PROTO_DIRS = (PROTO_DIR, Path("protos/kserve/v2"))


def proto_files() -> list[Path]:
    """The .proto sources, relative to the repository root."""
    return sorted(p.relative_to(ROOT) for d in PROTO_DIRS for p in (ROOT / d).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` (mirroring the source tree); returns the generated files.

    Call :func:`committed` on each to find the file it replaces.
    """
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(ROOT / p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for d in PROTO_DIRS for p in (out_dir / d).glob("*_pb2*.py*"))


def committed(generated: Path, out_dir: Path) -> Path:
    """The committed stub that ``generated`` (a file :func:`generate` wrote under ``out_dir``) replaces."""
    return ROOT / generated.relative_to(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = committed(path, Path(tmp))
            shutil.copyfile(path, target)
            print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
