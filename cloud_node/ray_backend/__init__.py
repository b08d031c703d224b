"""The cloud's tails on Ray Serve (``ray:`` in cloud.yaml; off by default).

Cleave keeps its own gRPC front door (sessions, ``Infer`` streams, KServe, health, TLS, tokens) and
hands each request's features, still encoded, to the model's Serve deployment; a replica decodes
them, runs the tail and encodes the outputs. Nothing here is imported unless ``ray.address`` is set,
so a cloud without Ray installed runs exactly as before.

- :mod:`.messages`: what travels between front door and replica (bytes and plain values; no ray import).
- :mod:`.replica`: the deployment class (runs in the replica processes).
- :mod:`.serving`: the front door's side: connect, deploy, call with retries, report status.
"""

import os


def before_ray_import() -> None:
    """Make the Ray this process loads leave SIGTERM to the daemon; call before ``import ray``.

    Ray's core worker installs a C++ handler for fatal signals that also catches SIGTERM and aborts
    the process after Python's handler ran, so a daemon that had joined Ray could not drain on
    SIGTERM. Both Ray paths (serving here, jobs in :mod:`cloud_node.jobs.ray_tasks`) call this.
    """
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # Ray starts a whole local cluster (dashboard included) when an API is used before ray.init;
    # a Serve handle's metrics pusher outliving its session did just that. Cleave joins Ray only
    # through connect() and RayJobs, explicitly.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
