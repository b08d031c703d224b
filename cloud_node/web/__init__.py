"""The cloud daemon's HTTP face: KServe v2 over HTTP, a REST API for compression jobs, a web console.

One implementation behind two faces: every route here converts HTTP to the plain calls the gRPC
servicers make (:class:`~cloud_node.openinference.OpenInference`,
:class:`~cloud_node.jobs.JobManager`, :class:`~cloud_node.sessions.SessionManager`) and maps
their typed errors (:mod:`protos.errors`) to HTTP statuses with the v2 error body
``{"error": "..."}``.

Threads: uvicorn runs in its own thread (``http``) with its own asyncio event loop, started and
stopped with the daemon (:class:`.server.HttpServer`). That loop owns the sockets, the ASGI app and
request parsing; blocking work (inference, uploads, job queries, watching a job) runs in the
loop's worker threads (``anyio.to_thread``), and touches shared state only through the backends'
own locks. :class:`.app.Backends` is written once per backend by the daemon's load thread and read
by the loop (a reference swap, atomic in CPython).
"""
