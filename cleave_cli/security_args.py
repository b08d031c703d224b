"""``--ca/--cert/--key/--server-name/--tls/--token/--token-file`` for every client command.

Each flag falls back to an environment variable (``CLEAVE_CA``, ``CLEAVE_CERT``, ``CLEAVE_KEY``,
``CLEAVE_SERVER_NAME``, ``CLEAVE_TLS=1``, ``CLEAVE_TOKEN``, ``CLEAVE_TOKEN_FILE``), so a shell can be
pointed at a secured deployment once. Prefer ``CLEAVE_TOKEN`` or ``--token-file`` to ``--token``:
command lines show in ``ps``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

_ENV = {
    "ca": "CLEAVE_CA",
    "cert": "CLEAVE_CERT",
    "key": "CLEAVE_KEY",
    "server_name": "CLEAVE_SERVER_NAME",
    "token": "CLEAVE_TOKEN",
    "token_file": "CLEAVE_TOKEN_FILE",
}


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """Add the TLS and token flags to a client command."""
    g = parser.add_argument_group("TLS and auth (each flag also reads the environment variable named)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's roots (CLEAVE_TLS=1)")
    g.add_argument("--ca", help="CA bundle the daemon's certificate must chain to; implies TLS (CLEAVE_CA)")
    g.add_argument("--cert", help="client certificate, for daemons that require mutual TLS (CLEAVE_CERT)")
    g.add_argument("--key", help="the client certificate's key (CLEAVE_KEY)")
    g.add_argument("--server-name", help="name expected in the daemon's certificate (CLEAVE_SERVER_NAME)")
    g.add_argument("--token", help="bearer token; prefer CLEAVE_TOKEN or --token-file (CLEAVE_TOKEN)")
    g.add_argument("--token-file", help="file whose first line is the bearer token (CLEAVE_TOKEN_FILE)")


def _value(args: argparse.Namespace, name: str) -> str:
    return getattr(args, name, None) or os.environ.get(_ENV[name], "")


def channel_security(args: argparse.Namespace) -> dict[str, Any]:
    """``open_channel`` keyword arguments (``tls``, ``token``) from the flags and the environment."""
    from runtime.security import ClientAuth, ClientTLS  # gRPC: not needed to build the parsers

    tls = ClientTLS(
        enabled=bool(getattr(args, "tls", False)) or os.environ.get("CLEAVE_TLS", "") not in ("", "0"),
        ca=_value(args, "ca"),
        cert=_value(args, "cert"),
        key=_value(args, "key"),
        server_name=_value(args, "server_name"),
    )
    # A flag beats the environment, for the token as a whole: --token-file wins over CLEAVE_TOKEN.
    if getattr(args, "token", None) or getattr(args, "token_file", None):
        auth = ClientAuth(token=args.token or "", token_file=args.token_file or "")
    else:
        auth = ClientAuth(token=os.environ.get("CLEAVE_TOKEN", ""), token_file=os.environ.get("CLEAVE_TOKEN_FILE", ""))
    token = auth.load()
    return {"tls": tls if tls.active else None, "token": token}
