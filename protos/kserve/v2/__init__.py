"""KServe v2 Open Inference Protocol stubs (package ``inference``).

Only the cloud daemon imports these, and only from :mod:`cloud_node.kserve`: Triton's and KServe's
clients register messages with the same full names in protobuf's default pool, so a process that
imports both fails with a duplicate-symbol error.
"""
