"""One line per failure: what went wrong, and what to do about it, instead of a traceback or a
bare gRPC status that misleads (``Method not found!``, ``Socket closed``).

gRPC tells a client little about a failed TLS set-up: a server that refuses our certificate, and a
TLS server reached in plaintext, both close the socket. :func:`explain` says what the client can
know (whether it spoke TLS, with a certificate or not) and names the likely causes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

COMPRESSION_OFF = (
    "the Compression service is off on {target} (or it is not a cleave-cloud): "
    "start cleave-cloud with --jobs-dir DIR (or a jobs: section with dir: in cloud.yaml) to enable it"
)
#: What `pip install cleave` leaves out and the `cloud` extra brings (docs/edge-bundle.md): `cleave bundle`,
#: `plan`, `profile` and `info --cuts` need them; on the torch-free edge they failed with a traceback.
CLOUD_EXTRA = ("torch", "torchvision", "scipy", "onnx", "torch_pruning", "safetensors")
_HANDSHAKE_HINTS = ("socket closed", "handshake", "ssl", "tls", "certificate", "connection reset")


def speaks_no_grpc(details: str) -> bool:
    """Whether gRPC's ``details`` say the port answered in something other than HTTP/2 (an HTTP/1 server):
    something listens there, but it is no gRPC daemon."""
    return "failed parsing http/2" in details.lower()


def not_grpc(target: str) -> str:
    """What to say of a ``target`` that answers but not in gRPC (the cloud's --http-port, a web server)."""
    return (
        f"{target} answers, but not in gRPC (HTTP/1?): is it the cloud's --http-port (KServe over HTTP, "
        "the console)? give the daemon's gRPC port (--port, or listen: in its YAML)"
    )


def target_of(args: argparse.Namespace) -> str:
    """The daemon a command talks to."""
    return getattr(args, "cloud", None) or getattr(args, "edge", None) or "the daemon"


def _speaks_tls(args: argparse.Namespace) -> tuple[bool, bool]:
    """(TLS on, client certificate given), from the flags and the environment as channel_security reads them."""
    tls = bool(getattr(args, "tls", False) or getattr(args, "ca", None) or os.environ.get("CLEAVE_CA"))
    tls = tls or os.environ.get("CLEAVE_TLS", "") not in ("", "0")
    cert = bool(getattr(args, "cert", None) or os.environ.get("CLEAVE_CERT"))
    return tls or cert, cert


def explain_rpc(code: str, details: str, args: argparse.Namespace) -> str:
    """A gRPC failure of ``args.command`` as a line a user can act on."""
    target = target_of(args)
    lowered = details.lower()
    if code == "UNIMPLEMENTED" and details.strip() == "Method not found!":
        if args.command in ("compress", "jobs"):
            return f"UNIMPLEMENTED: {COMPRESSION_OFF.format(target=target)}"
        return f"UNIMPLEMENTED: {target} does not serve this call: is it the right daemon (cloud or edge) and version?"
    if code == "UNAVAILABLE" and speaks_no_grpc(details):  # "nothing answers" would send the user looking for a daemon
        return f"UNAVAILABLE: {not_grpc(target)}"
    if code == "UNAVAILABLE":
        tls, cert = _speaks_tls(args)
        handshake = any(hint in lowered for hint in _HANDSHAKE_HINTS)
        if "connection refused" in lowered or ("failed to connect to all addresses" in lowered and not handshake):
            return (
                f"UNAVAILABLE: nothing answers on {target} ({details}): is the daemon running? "
                f"after starting one, `cleave wait --{_role(args)} {target}` waits until it serves"
            )
        if handshake:
            if not tls:
                why = (
                    f"{target} probably serves TLS and this client spoke plaintext: "
                    "give --ca CA.crt (or --tls for the system's roots; CLEAVE_CA / CLEAVE_TLS=1)"
                )
            elif cert:
                why = (
                    f"{target} refused the client certificate (--cert not signed by a CA it trusts), "
                    "or does not serve TLS, or --ca is not the CA of its certificate"
                )
            else:
                why = (
                    f"{target} may require a client certificate (mutual TLS: give --cert and --key), "
                    "or does not serve TLS, or --ca is not the CA of its certificate"
                )
            return f"UNAVAILABLE: the TLS handshake with {target} failed ({details}): {why}"
    if code == "DEADLINE_EXCEEDED":
        return f"DEADLINE_EXCEEDED: no answer from {target} in time ({details}); a larger --timeout may help"
    return f"{code}: {details}"


def _role(args: argparse.Namespace) -> str:
    return "cloud" if getattr(args, "cloud", None) else "edge"


def explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The line to print for ``exc``; None for an unexpected error (a bug: let its traceback show)."""
    import grpc  # already imported by any command that can raise RpcError

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code: Any = exc.code()
        return explain_rpc(code.name if code is not None else "UNKNOWN", exc.details() or "", args)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in CLOUD_EXTRA:
        return (
            f"this command needs {exc.name}, which is not installed here (the torch-free edge installs none of "
            f"{', '.join(CLOUD_EXTRA)}): pip install 'cleave[cloud]', or run it where the cloud runs"
        )
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return None
