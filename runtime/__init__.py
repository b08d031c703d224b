"""What both daemons share that is neither protobuf nor partitioning.

- :mod:`runtime.serving`: the gRPC server (health, reflection, draining stop) and channel builders,
  keepalive settings both ends agree on.
- :mod:`runtime.security`: TLS, mutual TLS and bearer tokens, on servers and channels.
- :mod:`runtime.admission`: per-client quotas on slots and streams (``RESOURCE_EXHAUSTED``).
- :mod:`runtime.metrics`: Prometheus per-RPC metrics and the ``/metrics`` endpoint.
- :mod:`runtime.settings`: YAML config files into frozen dataclasses, validated at load.
- :mod:`runtime.logsafe`: client-supplied text escaped in log lines.
- :mod:`runtime.handlers`: gRPC's four method-handler kinds, spelled out once.
- :mod:`runtime.memory`: glibc keeps freed request buffers' pages (no page faults per request).

Imports flow one way: protos <- compressor <- partitioner <- runtime <- {edge_node, cloud_node}
(``tests/test_layers.py`` enforces it). Nothing here imports torch.
"""
