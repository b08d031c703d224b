"""Where the Lite0 benchmarks' results go, and how they are written: ``OUT.json`` and its plot ``OUT.png``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write(result: dict[str, Any], out: Path, plot: Callable[[dict[str, Any], Path], None], tag: str) -> None:
    """Write ``result`` to ``out``.json and ``plot`` it to ``out``.png; say so, prefixed by ``[tag]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"[{tag}] wrote {out.with_suffix('.json')} and .png")
