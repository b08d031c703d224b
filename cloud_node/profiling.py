"""``Profile`` requests: measured in turns, capped, and abandoned when their caller is gone.

Profiles run one model run at a time (concurrent runs would skew each other's timings), but no
caller holds the host for a whole profile: between runs the one measuring passes its turn to
whoever waits (:class:`TurnLock`), so a small profile finishes while a large one is under way.
Between runs the caller's deadline and cancellation are checked too, so a profile nobody waits
for any more stops within one run.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

from partitioner.loaded import LoadedModel
from partitioner.profile import Profile, cached_profile
from protos.errors import DeadlineExceeded, ResourceExhausted


class TurnLock:
    """A first-come-first-served lock whose holder can let every waiter take a turn, then continue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # the head holds the lock; the rest wait in order

    @property
    def waiting(self) -> int:
        with self._cond:
            return max(len(self._queue) - 1, 0)

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (at most ``timeout`` s); False when it did not come in time."""
        me = object()
        with self._cond:
            self._queue.append(me)
            if self._cond.wait_for(lambda: self._queue[0] is me, timeout):
                return True
            self._queue.remove(me)
            self._cond.notify_all()
            return False

    def release(self) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

    def pass_turn(self) -> None:
        """Holder only: go to the back of the queue and wait until the lock comes round again."""
        with self._cond:
            if len(self._queue) < 2:
                return
            me = self._queue.popleft()
            self._queue.append(me)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._queue[0] is me)


class Profiler:
    """Runs profiles for callers that are still there, taking turns with other callers.

    Args:
        max_waiting: profiles that may wait for their turn; more answer RESOURCE_EXHAUSTED.
    """

    def __init__(self, max_waiting: int = 4) -> None:
        self.max_waiting = max_waiting
        self._turns = TurnLock()

    def profile(
        self,
        model: LoadedModel,
        *,
        batch: int | None,
        repeats: int,
        warmup: int,
        refresh: bool,
        input_shape: Sequence[int] | None = None,
        time_left: Callable[[], float],
        active: Callable[[], bool],
    ) -> Profile:
        """The profile of ``model`` (cached when it has one and ``refresh`` is false).

        ``time_left`` (seconds until the caller's deadline) and ``active`` (the caller is still
        there) are checked before every run; DeadlineExceeded when either says stop.
        """
        runs = 0

        def between() -> None:
            nonlocal runs
            if not active() or time_left() <= 0:
                raise DeadlineExceeded(f"Profile: the caller's deadline passed or it went away after {runs} runs")
            runs += 1
            self._turns.pass_turn()

        if self._turns.waiting >= self.max_waiting:
            raise ResourceExhausted(f"Profile: {self.max_waiting} profiles already wait for their turn")
        if not self._turns.acquire(timeout=max(min(time_left(), 600.0), 0.0)):
            raise DeadlineExceeded("Profile: no turn to measure before the caller's deadline")
        try:
            return cached_profile(
                model,
                batch=batch,
                refresh=refresh,
                role="cloud",
                input_shape=input_shape,
                repeats=repeats,
                warmup=warmup,
                between=between,
            )
        finally:
            self._turns.release()
