"""How long ``cleave plan`` takes, cold (empty cache) and warm, as a user runs it (wall clock).

    python -m benchmarks.plan_time                                # resnet50 and efficientnet_b0, this tree
    python -m benchmarks.plan_time --before /other/checkout       # and an older tree, run for run beside it

Each run is ``cleave plan --model M --bandwidth 10`` in a new process: cold with an empty
``CLEAVE_CACHE`` (profile, encoded sizes and accuracy all measured), then warm on the cache it
filled. With ``--before``, the other tree's cold and warm runs come right after this tree's, so
both see the same machine load; each side keeps its own cache. The phases (profile, encodings,
accuracy) are what ``cleave plan`` prints on stderr without ``--quiet``, each summed over its
rounds (sizes are measured at more cuts as the walk reaches them); the best placement is
recorded too. Writes ``benchmarks/results/plan_time.json``. Numbers depend on the load: the load
average before and after each pair of runs is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.startup import git_commit  # the measured checkout's commit, "+dirty" when changed

ROOT = Path(__file__).resolve().parent.parent
PHASE = re.compile(r"(?P<name>profile|encodings|accuracy) (?P<s>[0-9.]+) s(?: \((?P<count>[^)]*)\))?")


def plan_once(root: Path, python: str, model: str, cache: Path, bandwidth: str, extra: list[str]) -> dict:
    """One ``cleave plan`` run of the tree at ``root``: wall seconds, its phases and its best placement."""
    env = {**os.environ, "PYTHONPATH": str(root), "CLEAVE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    # What the `cleave` console script runs; stderr is a pipe, so each phase prints one line as it ends.
    argv = [python, "-c", "import sys; from cleave_cli.main import main; sys.exit(main())"]
    argv += ["plan", "--model", model, "--bandwidth", bandwidth, *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cleave plan --model {model} in {root} exited {done.returncode}:\n{done.stderr[-2000:]}")
    phases: dict[str, dict] = {}
    for m in PHASE.finditer(done.stderr):  # encodings and accuracy alternate when more cuts are measured
        phase = phases.setdefault(m["name"], {"s": 0.0})
        phase["s"] = round(phase["s"] + float(m["s"]), 1)
        if m["count"]:
            phase["count"] = m["count"]
    best = next((line.split()[1:3] for line in done.stdout.splitlines() if line.startswith("*")), [])
    return {"wall_s": round(elapsed, 2), "phases": phases, "best": " ".join(best)}


def measure(trees: dict[str, Path], python: str, models: list[str], bandwidth: str, extra: list[str]) -> list[dict]:
    rows = []
    for model in models:
        row: dict = {"model": model, "load_avg_1m_before": os.getloadavg()[0]}
        for label, root in trees.items():
            with tempfile.TemporaryDirectory(prefix="cleave-plan-cache-") as cache:
                cold = plan_once(root, python, model, Path(cache), bandwidth, extra)
                warm = plan_once(root, python, model, Path(cache), bandwidth, extra)
            row[label] = {"cold": cold, "warm": warm}
            print(f"{model} {label}: cold {cold['wall_s']:.1f} s, warm {warm['wall_s']:.1f} s, best {cold['best']}")
        row["load_avg_1m_after"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,efficientnet_b0", help="comma-separated (default: %(default)s)")
    p.add_argument("--bandwidth", default="10", help="Mbit/s, as cleave plan takes it (default: %(default)s)")
    p.add_argument("--before", type=Path, help="another checkout to measure beside this one (same venv)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the dependencies (default: this one)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/plan_time.json",
        help="results file (default: %(default)s)",
    )
    args, extra = p.parse_known_args(argv)  # anything else goes to cleave plan (e.g. --top 10)
    trees = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    rows = measure(trees, args.python, args.models.split(","), args.bandwidth, extra)
    report = {
        "command": f"cleave plan --model M --bandwidth {args.bandwidth}" + "".join(f" {e}" for e in extra),
        "trees": {label: {"root": str(root), "commit": git_commit(root)} for label, root in trees.items()},
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
