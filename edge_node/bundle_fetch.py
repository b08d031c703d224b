"""Fetch the model's edge bundle from the cloud at start-up (``fetch_bundle:`` in edge.yaml).

:func:`ensure_bundle` makes ``bundle:`` (a directory) hold a verified bundle of the model the cloud
serves under ``fetch_bundle.model``:

* a valid bundle already there whose fingerprint is the cloud's (``GetInfo``) is used as it is;
  one that is valid while the cloud cannot be reached is used too (an edge restarts offline);
  without one, the edge waits up to ``fetch_bundle.timeout_s`` for a cloud that is not up yet;
* otherwise the bundle is streamed by ``GetBundle`` over the same channel settings as the cloud
  link (TLS, token) into a new directory beside ``bundle:``, under the limits of
  :class:`~edge_node.config.FetchBundle` (:class:`~partitioner.bundle_wire.BundleReceiver`),
  verified by :meth:`EdgeBundle.open`, and only then renamed into place. A bundle that fails a
  check is refused naming the file; what ``bundle:`` held before is left as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from partitioner.bundle import BundleError, EdgeBundle
from partitioner.bundle_wire import BundleReceiver
from protos.cleave.v1 import split_inference_pb2 as si_pb2
from protos.cleave.v1 import split_inference_pb2_grpc as si_grpc
from protos.errors import from_rpc_error
from runtime.serving import open_channel

from .config import EdgeConfig

log = logging.getLogger(__name__)

#: Answers that mean the cloud is not there (yet): a valid local bundle is used without it.
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class BundleFetchError(ValueError):
    """The bundle could not be fetched or failed a check; the message names the file or the cause."""


def ensure_bundle(config: EdgeConfig) -> Path:
    """Make ``config.bundle`` hold a verified bundle of ``config.fetch_bundle.model``; its path."""
    settings = config.fetch_bundle
    dest = Path(config.bundle)
    local = _valid_local(dest, settings.model)
    channel = open_channel(
        config.cloud,
        config.limits.max_message_bytes,
        tls=config.cloud_tls,
        token=config.cloud_auth.load(),
        keepalive=config.keepalive,
    )
    try:
        stub = si_grpc.SplitInferenceStub(channel)
        # Without a bundle the edge has nothing to run: wait (up to timeout_s) for a cloud still starting.
        deadline = time.monotonic() + settings.timeout_s
        while True:
            try:
                info = stub.GetInfo(
                    si_pb2.GetInfoRequest(model=settings.model),
                    timeout=config.reconnect.connect_timeout_s,
                    wait_for_ready=True,
                )
                break
            except grpc.RpcError as exc:
                unreachable = exc.code() in UNREACHABLE
                if local is not None and unreachable:
                    log.warning(
                        "fetch_bundle: the cloud %s is not reachable (%s): using the bundle already in %s (%s)",
                        config.cloud, exc.code().name, dest, local.manifest.fingerprint[:12],
                    )  # fmt: skip
                    return dest
                if not unreachable or time.monotonic() >= deadline:
                    raise BundleFetchError(
                        f"fetch_bundle: cannot ask {config.cloud} for {settings.model!r}: {from_rpc_error(exc).message}"
                    ) from None
                log.info("fetch_bundle: waiting for the cloud %s (%s)", config.cloud, exc.code().name)
                time.sleep(config.reconnect.initial_s)
        fingerprint = info.models[0].fingerprint
        if local is not None and local.manifest.fingerprint == fingerprint:
            log.info("fetch_bundle: %s already holds %s (%s): not fetched", dest, settings.model, fingerprint[:12])
            return dest
        fetch(stub, settings.model, fingerprint, dest, config)
        return dest
    finally:
        channel.close()


def fetch(stub: si_grpc.SplitInferenceStub, model: str, fingerprint: str, dest: Path, config: EdgeConfig) -> None:
    """Stream ``model``'s bundle into a new directory beside ``dest``, verify it, then move it into place."""
    settings = config.fetch_bundle
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
    try:
        receiver = BundleReceiver(staging / "bundle", settings.max_bytes, settings.max_files)
        call = stub.GetBundle(si_pb2.GetBundleRequest(model=model), timeout=settings.timeout_s)
        try:
            receiver.receive(call, expect_fingerprint=fingerprint)
        except BundleError as exc:
            call.cancel()  # a cloud sending more than declared (or wrong bytes) is cut off here
            raise BundleFetchError(
                f"fetch_bundle: refused the bundle of {model!r} from {config.cloud}: {exc}"
            ) from None
        except grpc.RpcError as exc:
            raise BundleFetchError(
                f"fetch_bundle: {config.cloud} did not send the bundle of {model!r}: {from_rpc_error(exc).message}"
            ) from None
        _replace(staging / "bundle", dest, staging)
        log.info("fetch_bundle: fetched %s (%s, %d bytes) into %s", model, fingerprint[:12], receiver.received, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _valid_local(dest: Path, model: str) -> EdgeBundle | None:
    """The bundle in ``dest`` if it is one, whole, of ``model``; None (saying why) otherwise."""
    if not dest.exists():
        return None
    try:
        bundle = EdgeBundle.open(dest)
    except BundleError as exc:
        log.warning("fetch_bundle: %s is not a usable bundle (%s): fetching it again", dest, exc)
        return None
    if bundle.manifest.name != model:
        log.warning("fetch_bundle: %s holds %r, not %r: fetching", dest, bundle.manifest.name, model)
        return None
    return bundle


def _replace(new: Path, dest: Path, staging: Path) -> None:
    """Move ``new`` to ``dest``; what ``dest`` held goes into ``staging`` (deleted after), restored on failure."""
    old = staging / "previous"
    had_old = dest.exists() or dest.is_symlink()
    if had_old:
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except OSError:
        if had_old:
            os.replace(old, dest)
        raise


__all__ = ["BundleFetchError", "ensure_bundle", "fetch"]
