"""Where a job's independent evaluations (a sweep's grid points) run: the executor interface.

:class:`LocalPool` is what a job has always used: a pool of spawned processes on this machine,
inside the job's sandbox. :class:`cloud_node.jobs.ray_tasks.RayTasks` runs each evaluation as a
Ray task with declared resources instead, so a sweep spreads over the nodes of a Ray cluster; it
is only imported (and Ray with it) when the daemon is configured for Ray jobs.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol


class Evaluations(Protocol):
    """Runs ``fn(*args)`` for each argument tuple, possibly in parallel, elsewhere."""

    name: str

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> Generator[Any, None, None]:
        """The results in the order of ``calls``, each as soon as it and those before it are done.
        ``fn`` must be a module-level function (it is called in another process). Closing the
        iterator early cancels the calls not yet finished."""
        ...


class LocalPool:
    """Up to ``workers`` spawned processes on this machine, each killed when its parent dies."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> Generator[Any, None, None]:
        from .engines import die_with_parent

        mp = multiprocessing.get_context("spawn")
        n = max(1, min(self.workers, len(calls)))
        with ProcessPoolExecutor(max_workers=n, mp_context=mp, initializer=die_with_parent) as pool:
            futures = [pool.submit(fn, *args) for args in calls]
            try:
                for fut in futures:
                    yield fut.result()
            finally:
                for fut in futures:
                    fut.cancel()
