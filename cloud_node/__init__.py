"""The cloud daemon: serves model tails for edge sessions (``cleave-cloud``).

Logic lives in plain classes (:mod:`cloud_node.sessions`, :mod:`cloud_node.streams`) that tests use
without a server; :mod:`cloud_node.servicer` only adapts them to gRPC.
"""

__version__ = "0.1.0"
