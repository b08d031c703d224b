"""The cloud's compression service: job store (SQLite + artifact directory), manager, engines,
and the ``Compression`` gRPC servicer.

- :class:`JobManager` (logic, testable without a server): upload, submit, get, list, watch, cancel.
- :class:`CompressionServicer`: the thin gRPC adapter over it.
- :mod:`.engines`: the dispatcher and the built-in engines; user engines come from the
  ``cleave.engines`` entry-point group of installed packages.
"""

from .manager import JobManager
from .servicer import CompressionServicer

__all__ = ["CompressionServicer", "JobManager"]
