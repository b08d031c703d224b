"""A one-line progress display on stderr for commands with slow phases (``cleave plan``).

On a terminal the line is rewritten in place (``profile 3.1 s | encodings 120/176``); otherwise
(a pipe, a log file) each phase prints one line when it ends, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Phases, each with an optional count of steps done; elapsed seconds per finished phase."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._done: list[str] = []
        self._phase = ""
        self._started = 0.0
        self._detail = ""

    def start(self, phase: str) -> None:
        """Begin ``phase`` (ending the current one)."""
        self.end()
        self._phase, self._started, self._detail = phase, time.perf_counter(), ""
        self._draw()

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` steps of the current phase (of ``total``, when known)."""
        detail = f"{done}/{total}" if total else str(done)
        if detail != self._detail:
            self._detail = detail
            self._draw()

    def end(self) -> None:
        """End the current phase, if any."""
        if not self._phase:
            return
        text = f"{self._phase} {time.perf_counter() - self._started:.1f} s" + (
            f" ({self._detail})" if self._detail else ""
        )
        self._done.append(text)
        self._phase = ""
        if self.enabled and not self.tty:
            print(text, file=self.stream, flush=True)
        self._draw()

    def close(self) -> None:
        """End the last phase and leave the line."""
        self.end()
        if self.tty:
            print(file=self.stream, flush=True)

    def _draw(self) -> None:
        if not self.tty:
            return
        now = f"{self._phase} {self._detail}".strip()
        line = " | ".join([*self._done, *([now + "..."] if now else [])])
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
