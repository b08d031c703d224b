"""Client-supplied text in logs: escaped, so a newline or a terminal escape cannot forge a line.

:func:`printable` is for a single value a log line quotes (a client name, a model name); the
:class:`EscapingFilter` that both daemons install escapes control characters in every formatted
message, whatever its arguments, as a second line of defence. Tracebacks are left as they are.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(value: object, limit: int = 120) -> str:
    """``value`` as one printable line: control characters escaped, cut to ``limit`` characters."""
    text = str(value)
    cut = text[:limit]
    out = _CONTROL.sub(_escape, cut)
    return out + f"...(+{len(text) - limit})" if len(text) > limit else out


class EscapingFilter(logging.Filter):
    """Rewrites each record's message with its control characters escaped (the message stays one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = _CONTROL.sub(_escape, message), None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Escape control characters in every record the root logger's handlers (or ``logger``'s) emit."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, EscapingFilter) for f in handler.filters):
            handler.addFilter(EscapingFilter())
