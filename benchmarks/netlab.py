"""A small network lab for measuring Cleave on real, shaped links.

Two network namespaces (``edge`` and ``cloud``) joined by one veth pair, with:

- **bandwidth** shaped by ``tc tbf`` on each veth end: the edge end's egress is the uplink, the cloud end's
  egress the downlink (``NetLab.shape``; re-shaping changes the qdisc in place, so it can be done mid-stream);
- **link cuts** by setting the veth down/up (``NetLab.set_link``);
- **RTT** added by a user-space TCP relay (``DelayRelay``), because this kernel has no ``netem``;
- **slower devices** emulated by running a process in a fresh cgroup-v1 ``cpu`` cgroup with a CFS quota
  (``NetLab.popen(..., cpu_quota=0.25)`` = a quarter of one core).

Typical use (as root; everything is torn down on exit, also after an exception, SIGINT or SIGTERM)::

    from benchmarks.netlab import DelayRelay, NetLab   # from the repository root

    ok, why = NetLab.available()          # skip / exit cleanly with `why` when not ok
    with NetLab() as lab:
        lab.shape(up_mbit=5, down_mbit=20)
        # cloud daemon binds loopback inside the cloud namespace; the relay is the only thing the edge sees
        cloud = lab.popen(lab.cloud_ns, ["cleave-cloud", "--port", "50051", ...])
        relay = lab.relay(lab.cloud_ns, listen=f"{lab.cloud_ip}:0", target="127.0.0.1:50051", delay_ms=10)
        edge = lab.popen(lab.edge_ns, ["cleave-edge", "--cloud", relay.address, ...], cpu_quota=0.25)
        lab.shape(up_mbit=1)              # change the link while requests are flowing
        lab.set_link(False)               # cut it

Traffic stays inside the lab's own namespaces (a private /24) and their loopbacks.

Command line (the relay and the measuring tools run as subprocesses inside a namespace)::

    python -m benchmarks.netlab --selftest       # build a lab, measure shaping, RTT and CPU quota, clean up
    python -m benchmarks.netlab relay --listen IP:PORT --target IP:PORT --delay-ms D
    python -m benchmarks.netlab cleanup          # remove labs left behind by processes that no longer exist

This module imports only the standard library, so its subprocesses start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

THIS_FILE = Path(__file__).resolve()
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000
EDGE_IF, CLOUD_IF = "to-cloud", "to-edge"  # veth ends, each inside its own namespace (no root-namespace names)

_counter = itertools.count()
_available: tuple[bool, str] | None = None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", "-n", ns, *args], check=check, capture_output=True, text=True, timeout=20)


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def cpu_cgroup_parent() -> Path:
    """The cpu cgroup this process is in: new cgroups nest under it, so any limit already on us still applies."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return CGROUP_CPU_ROOT / path.lstrip("/")
    return CGROUP_CPU_ROOT


# tbf sizing (see tbf_params). The veths also send one packet per skb (gso_max_segs 1): tbf then shapes real
# packets instead of 64 KB GSO bursts it would have to split, which made it drop far more at low rates.
TBF_MIN_BURST = 1600  # bytes: one full frame (1514) must fit
TBF_BURST_MS = 1.0
TBF_QUEUE_MS = 50.0
TBF_MIN_QUEUE = 32_000  # bytes


def tbf_params(mbit: float) -> tuple[int, int, int]:
    """(rate bit/s, burst bytes, queue limit bytes) for a tbf at `mbit` Mbit/s (line rate, headers included).

    Burst: one frame at low rates, 1 ms of traffic at high ones. A small burst keeps short messages from crossing
    at wire speed (a 4.5 KB burst made a 19 KB transfer at 1 Mbit/s 19% faster than the rate says); tbf uses
    hrtimers, so the burst need not cover a timer tick.
    Queue: 50 ms of traffic, at least 32 KB so that TCP at 1 Mbit/s still has ~20 packets of room. A bulk TCP
    flow fills it (the shaped hop has ~0 base RTT), so small messages sent behind a transfer in the same
    direction wait up to that long, as on a real bottleneck link with a buffer.
    """
    rate_bps = int(mbit * 1e6)
    burst = max(TBF_MIN_BURST, int(rate_bps / 8 * TBF_BURST_MS / 1e3))
    limit = max(TBF_MIN_QUEUE, int(rate_bps / 8 * TBF_QUEUE_MS / 1e3)) + burst
    return rate_bps, burst, limit


class NetLab:
    """An edge and a cloud network namespace joined by a veth pair; a context manager that cleans up on exit.

    Names carry the pid, a counter and a random token, so parallel labs (also from parallel test runs) never
    collide. ``edge_ip``/``cloud_ip`` are the first two host addresses of ``subnet``.
    """

    def __init__(self, name: str = "cleave", subnet: str | None = None) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,19}", name):
            raise ValueError(f"lab name {name!r}: use 1-20 of [a-z0-9-]")
        k = next(_counter)
        net = ipaddress.ip_network(subnet or f"10.77.{(os.getpid() + k) % 250 + 1}.0/24")
        if not (isinstance(net, ipaddress.IPv4Network) and net.is_private and net.prefixlen <= 30):
            raise ValueError(f"subnet {subnet!r}: need a private IPv4 network of at least 4 addresses")
        self.prefix = f"{name}-{os.getpid()}-{k}-{secrets.token_hex(2)}"
        self.edge_ns, self.cloud_ns = f"{self.prefix}-edge", f"{self.prefix}-cloud"
        hosts = net.hosts()
        self.edge_ip, self.cloud_ip = str(next(hosts)), str(next(hosts))
        self.prefixlen = net.prefixlen
        self._procs: list[subprocess.Popen[Any]] = []
        self._cgroups: list[Path] = []
        self._started = self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") when this process can build a lab (root, ip/tc, netns, veth, tbf, cpu cgroup); else the reason.

        Runs a real probe once per process (creates and removes a throwaway namespace pair).
        """
        global _available
        if _available is None:
            _available = NetLab._probe()
        return _available

    @staticmethod
    def _probe() -> tuple[bool, str]:
        if not sys.platform.startswith("linux"):
            return False, f"netlab needs Linux network namespaces (this is {sys.platform})"
        if os.geteuid() != 0:
            return False, "netlab needs root (network namespaces, tc and cgroups); run as root to enable"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return False, f"netlab needs the `{tool}` command (iproute2), which is not installed"
        if not (CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists():
            return False, f"netlab needs the cgroup-v1 cpu controller at {CGROUP_CPU_ROOT} (cpu.cfs_quota_us missing)"
        if not os.access(cpu_cgroup_parent(), os.W_OK):
            return False, f"netlab cannot create cgroups under {cpu_cgroup_parent()} (not writable)"
        lab = NetLab(name="netlab-probe")
        try:
            lab._create()  # without start()'s process-wide hooks: a probe should not change signal handling
            lab.shape(10)
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            return False, f"netlab cannot build namespaces/veth/tbf here: {detail.strip()}"
        finally:
            lab.close()
        return True, ""

    def start(self) -> NetLab:
        """Create both namespaces, the veth pair, addresses and routes. Called by ``with``."""
        if not self._started:
            atexit.register(self.close)
            _exit_cleanly_on_sigterm()
            self._create()
        return self

    def _create(self) -> None:
        self._started = True
        try:
            _ip("netns", "add", self.edge_ns)
            _ip("netns", "add", self.cloud_ns)
            # Created directly inside the namespaces: no interface name ever appears in the root namespace.
            _ip("-n", self.edge_ns, "link", "add", EDGE_IF, "type", "veth", "peer", "name", CLOUD_IF,
                "netns", self.cloud_ns)  # fmt: skip
            for ns, dev, ip in ((self.edge_ns, EDGE_IF, self.edge_ip), (self.cloud_ns, CLOUD_IF, self.cloud_ip)):
                _ip("-n", ns, "addr", "add", f"{ip}/{self.prefixlen}", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")  # daemons bind 127.0.0.1 inside the namespaces
                _ip("-n", ns, "link", "set", dev, "gso_max_segs", "1", check=False)  # best effort: see tbf_params
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every process started in the lab, delete both namespaces (and so the veth) and the cgroups.

        Idempotent; also runs at interpreter exit.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        self._stop_processes()
        for ns in (self.edge_ns, self.cloud_ns):
            _ip("netns", "del", ns, check=False)
        for cg in self._cgroups:
            for _ in range(50):  # a killed task leaves the cgroup a moment after SIGKILL
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)

    def _stop_processes(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(OSError):
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2)
        # Anything our processes spawned that is still inside the lab (namespaces or cgroups) was started by us too.
        for pid in self._lab_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _lab_pids(self) -> set[int]:
        pids: set[int] = set()
        for ns in (self.edge_ns, self.cloud_ns):
            out = _ip("netns", "pids", ns, check=False).stdout
            pids.update(int(x) for x in out.split() if x.isdigit())
        for cg in self._cgroups:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (cg / "cgroup.procs").read_text().split())
        pids.discard(os.getpid())
        return pids

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the link --------------------------------------------------------------------------------------------
    def shape(self, up_mbit: float, down_mbit: float | None = None) -> None:
        """Limit the uplink (edge -> cloud) and downlink (cloud -> edge; default: same as up) with tbf.

        Calling it again changes the rates in place (`tc qdisc replace` on an existing tbf is a change), so an
        open connection keeps flowing at the new rate.
        """
        for ns, dev, mbit in (
            (self.edge_ns, EDGE_IF, up_mbit),
            (self.cloud_ns, CLOUD_IF, up_mbit if down_mbit is None else down_mbit),
        ):
            if mbit <= 0:
                raise ValueError(f"rate must be positive, got {mbit} Mbit/s")
            rate, burst, limit = tbf_params(mbit)
            _tc(ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf",
                "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit))  # fmt: skip

    def unshape(self) -> None:
        """Remove the shaping (veth runs at memory speed again)."""
        for ns, dev in ((self.edge_ns, EDGE_IF), (self.cloud_ns, CLOUD_IF)):
            _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore the link: both veth ends down/up. Addresses, routes and shaping survive."""
        state = "up" if up else "down"
        for ns, dev in ((self.edge_ns, EDGE_IF), (self.cloud_ns, CLOUD_IF)):
            _ip("-n", ns, "link", "set", dev, state)
        if up:  # wait for carrier, so the caller's next packet is not dropped
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if "LOWER_UP" in _ip("-n", self.edge_ns, "link", "show", EDGE_IF).stdout:
                    break
                time.sleep(0.01)

    def qdisc_stats(self) -> dict[str, str]:
        """`tc -s qdisc` of both veth ends (sent bytes, drops, overlimits), for logs."""
        return {
            "up": _tc(self.edge_ns, "-s", "qdisc", "show", "dev", EDGE_IF).stdout,
            "down": _tc(self.cloud_ns, "-s", "qdisc", "show", "dev", CLOUD_IF).stdout,
        }

    # ---- processes -------------------------------------------------------------------------------------------
    def _ns(self, ns: str) -> str:
        ns = {"edge": self.edge_ns, "cloud": self.cloud_ns}.get(ns, ns)
        if ns not in (self.edge_ns, self.cloud_ns):
            raise ValueError(f"{ns!r} is not a namespace of this lab ({self.edge_ns}, {self.cloud_ns})")
        return ns

    def popen(self, ns: str, argv: list[str], cpu_quota: float | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside namespace `ns` (a name of this lab, or "edge"/"cloud"); ``kw`` goes to Popen.

        ``cpu_quota`` puts the process (and its children) in a fresh cpu cgroup limited to that many cores of CPU
        time per CFS period (0.25 = a quarter of one core), to emulate a slower device. Stopped at ``close()``.
        """
        if not self._started or self._closed:
            raise RuntimeError("NetLab is not running; use it as a context manager or call start()")
        cmd = [*self._enter(ns), *argv]
        if cpu_quota is not None:
            procs = self._new_cgroup(cpu_quota) / "cgroup.procs"
            # The shell joins the cgroup, then execs: the process is limited before the command's first instruction.
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *cmd]
        proc = subprocess.Popen(cmd, **kw)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: list[str], timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run `argv` in namespace `ns` to completion (text output captured unless ``kw`` says otherwise)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([*self._enter(ns), *argv], timeout=timeout, **kw)

    def _enter(self, ns: str) -> list[str]:
        """The command prefix that runs a command in namespace ``ns``'s network, and nothing else changed.

        ``nsenter --net``, not ``ip netns exec``: the latter also enters a new mount namespace and mounts a fresh
        ``/sys`` there, without ``/sys/fs/cgroup``, so a process under ``cpu_quota`` could not see its quota
        (``runtime.cpus``) and sized its threads for the whole host."""
        return ["nsenter", f"--net=/run/netns/{self._ns(ns)}", "--"]

    def _new_cgroup(self, cpu_quota: float) -> Path:
        if not 0.01 <= cpu_quota <= os.cpu_count() * 1.0:  # type: ignore[operator]
            raise ValueError(f"cpu_quota {cpu_quota}: must be between 0.01 and the number of cores")
        cg = cpu_cgroup_parent() / f"{self.prefix}-{len(self._cgroups)}"
        cg.mkdir()
        self._cgroups.append(cg)
        (cg / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cg / "cpu.cfs_quota_us").write_text(str(int(cpu_quota * CFS_PERIOD_US)))
        return cg

    def relay(self, ns: str, listen: str, target: str, delay_ms: float) -> DelayRelay:
        """Start a `DelayRelay` in `ns` (see there); it is stopped at ``close()``."""
        return DelayRelay(listen, target, delay_ms, lab=self, ns=ns).start()

    # ---- measuring -------------------------------------------------------------------------------------------
    def measure(
        self,
        up_bytes: int = 0,
        down_bytes: int = 0,
        echoes: int = 0,
        delay_ms: float | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Measure the link from the edge: upload/download rates (Mbit/s of payload) and echo round trips (ms).

        A bulk server runs in the cloud namespace and a client in the edge namespace; with ``delay_ms`` the
        traffic goes through a ``DelayRelay`` with that one-way delay. Returns the client's JSON report:
        ``up_mbit``, ``down_mbit``, ``rtt_ms`` (list), ``rtt_median_ms``.
        """
        server = self.popen(
            self.cloud_ns, [sys.executable, str(THIS_FILE), "bulk-server", "--listen", f"{self.cloud_ip}:0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        relay = None
        try:
            target = _read_ready(server, 10.0)
            if delay_ms is not None:
                relay = self.relay(self.cloud_ns, f"{self.cloud_ip}:0", target, delay_ms)
                target = relay.address
            argv = [sys.executable, str(THIS_FILE), "bulk-client", "--target", target,
                    "--up", str(up_bytes), "--down", str(down_bytes), "--echoes", str(echoes)]  # fmt: skip
            out = self.run(self.edge_ns, argv, timeout=timeout, check=True)
            return json.loads(out.stdout)
        finally:
            if relay is not None:
                relay.stop()
            server.terminate()
            server.wait(5)


def _read_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    """Wait for the "READY host:port" line a helper subprocess prints once it listens; return the address."""
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    line = result[0].strip() if result else ""
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"helper {proc.args!r} did not start (got {line!r}, exit code {proc.poll()})")
    return line.split(" ", 1)[1]


_sigterm_installed = False


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit (once, main thread, only if nobody handles it) so `with` blocks and atexit run."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# ---- the delay relay -----------------------------------------------------------------------------------------
class DelayRelay:
    """A user-space TCP relay that delays every byte by ``delay_ms`` in each direction (RTT += 2 * delay_ms).

    A byte-stream relay (so it carries gRPC / HTTP/2 unchanged): each chunk read is stamped and written out
    ``delay_ms`` later, in order; half-closes are forwarded after the same delay. It runs as a subprocess,
    inside ``ns`` of ``lab`` when given (``nsenter --net=/run/netns/NS python netlab.py relay ...``), else in this
    namespace. ``listen`` may use port 0; ``address`` is the bound "ip:port" once started.

    Place it in the cloud namespace in front of the cloud daemon (which then binds 127.0.0.1 there): the edge's
    socket still sees the shaped link's backpressure, and the relay's queue sits on the fast loopback side.
    """

    def __init__(
        self, listen: str, target: str, delay_ms: float, *, lab: NetLab | None = None, ns: str | None = None
    ) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.listen, self.target, self.delay_ms = listen, target, delay_ms
        self.lab, self.ns = lab, ns
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> DelayRelay:
        argv = [sys.executable, str(THIS_FILE), "relay", "--listen", self.listen, "--target", self.target,
                "--delay-ms", str(self.delay_ms)]  # fmt: skip
        if self.lab is not None:
            self.proc = self.lab.popen(self.ns or self.lab.cloud_ns, argv, stdout=subprocess.PIPE, text=True)
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            atexit.register(self.stop)
        self.address = _read_ready(self.proc, 10.0)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader -> writer, each chunk `delay_s` after it was read. The queue bound gives backpressure."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)  # <= 256 x 64 KiB in flight

    async def pump_in() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay_s, data))
            if not data:  # EOF, forwarded as a half-close
                return

    async def pump_out() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(pump_in(), pump_out())


async def _relay_connection(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int], delay_s: float
) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    for w in (client_w, server_w):  # no Nagle: small frames (HTTP/2 pings, window updates) must not wait
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tasks = [
        asyncio.create_task(_delayed_pipe(client_r, server_w, delay_s)),
        asyncio.create_task(_delayed_pipe(server_r, client_w, delay_s)),
    ]
    try:  # both directions finish (EOF each way), or one fails (reset) and the connection is torn down
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        pass  # relay stopping; ending normally keeps 3.11's start_server callback from logging the cancellation
    finally:
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # a reset peer is normal for a relay: retrieve it so asyncio does not log it
            t.cancel()
        for w in (client_w, server_w):
            w.close()


async def serve_relay(listen: str, target: str, delay_ms: float) -> None:
    """Run the relay until cancelled; prints "READY ip:port" once listening."""
    host, port = _split_addr(listen)
    dest = _split_addr(target)
    server = await asyncio.start_server(
        lambda r, w: _relay_connection(r, w, dest, delay_ms / 1000.0), host, port, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop quietly: open connections are cancelled and closed
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"READY {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()


# ---- measuring tools (run as subprocesses inside the namespaces) ---------------------------------------------
class _BulkHandler(socketserver.StreamRequestHandler):
    """One command per connection: "U n" (receive n bytes, answer K), "D n" (send n bytes), "E" (echo to EOF)."""

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmd, *arg = self.rfile.readline().split()
        if cmd == b"U":
            left = int(arg[0])
            while left > 0 and (data := self.rfile.read1(min(left, 1 << 20))):
                left -= len(data)
            self.wfile.write(b"K\n")
        elif cmd == b"D":
            left, block = int(arg[0]), bytes(1 << 16)
            while left > 0:
                self.wfile.write(block[: min(left, len(block))])
                left -= len(block)
        elif cmd == b"E":
            while data := self.rfile.read1(65536):
                self.wfile.write(data)


def _bulk_server(listen: str) -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(_split_addr(listen), _BulkHandler) as server:
        host, port = server.server_address[:2]
        print(f"READY {host}:{port}", flush=True)
        server.serve_forever()


def _bulk_client(target: str, up: int, down: int, echoes: int) -> dict[str, Any]:
    addr, report = _split_addr(target), {}
    if up:
        with socket.create_connection(addr, timeout=60) as s:
            block = bytes(1 << 16)
            t0 = time.perf_counter()
            s.sendall(f"U {up}\n".encode())
            for off in range(0, up, len(block)):
                s.sendall(block[: min(len(block), up - off)])
            if s.makefile("rb").readline() != b"K\n":
                raise RuntimeError("upload: server did not confirm")
            report["up_mbit"] = up * 8 / (time.perf_counter() - t0) / 1e6
    if down:
        with socket.create_connection(addr, timeout=60) as s:
            t0, got = time.perf_counter(), 0
            s.sendall(f"D {down}\n".encode())
            while got < down and (data := s.recv(1 << 20)):
                got += len(data)
            report["down_mbit"] = got * 8 / (time.perf_counter() - t0) / 1e6
    if echoes:
        with socket.create_connection(addr, timeout=60) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"E\n")
            rtts = []
            for i in range(echoes):
                msg, got = f"{i:032d}".encode(), b""
                t0 = time.perf_counter()
                s.sendall(msg)
                while len(got) < len(msg) and (data := s.recv(64)):
                    got += data
                rtts.append((time.perf_counter() - t0) * 1e3)
                if got != msg:
                    raise RuntimeError(f"echo {i}: sent {msg!r}, got back {got!r}")
            report["rtt_ms"] = rtts
            report["rtt_median_ms"] = statistics.median(rtts)
    return report


# ---- command line --------------------------------------------------------------------------------------------
def cleanup_stale(name: str = "cleave") -> list[str]:
    """Remove namespaces and cpu cgroups named ``{name}-{pid}-...`` whose pid no longer exists (after a SIGKILL)."""
    removed = []
    pattern = re.compile(rf"{re.escape(name)}-(\d+)-\d+-[0-9a-f]{{4}}")

    def dead(label: str) -> bool:
        m = pattern.match(label)
        if not m:
            return False
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if dead(ns):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    parent = cpu_cgroup_parent()
    for cg in parent.glob(f"{name}-*") if parent.exists() else []:
        if dead(cg.name):
            with contextlib.suppress(OSError):
                cg.rmdir()
                removed.append(str(cg))
    return removed


def selftest() -> int:
    """Build a lab, check shaping accuracy at 1-100 Mbit/s, relay RTT and CPU quota, then check the cleanup."""
    ok, why = NetLab.available()
    if not ok:
        print(f"netlab selftest skipped: {why}")
        return 0
    failures: list[str] = []
    with NetLab(name="netlab-selftest") as lab:
        base = lab.measure(up_bytes=20_000_000)
        print(f"unshaped veth: {base['up_mbit']:.0f} Mbit/s")
        print(f"{'shaped Mbit/s':>14} {'up':>8} {'down':>8} {'up err':>8} {'down err':>8}")
        for mbit in (1, 5, 20, 100):
            lab.shape(mbit, mbit)
            n = int(mbit * 1e6 / 8 * 0.8)  # ~0.8 s per direction
            r = lab.measure(up_bytes=n, down_bytes=n)
            errs = [r["up_mbit"] / mbit - 1, r["down_mbit"] / mbit - 1]
            print(f"{mbit:>14} {r['up_mbit']:>8.2f} {r['down_mbit']:>8.2f} {errs[0]:>+8.1%} {errs[1]:>+8.1%}")
            failures += [f"{mbit} Mbit/s measured {e:+.0%}" for e in errs if abs(e) > 0.15]
        lab.unshape()
        for delay in (0, 10, 25):
            r = lab.measure(echoes=40, delay_ms=delay)
            print(f"relay one-way {delay} ms: RTT median {r['rtt_median_ms']:.2f} ms (target {2 * delay} ms)")
            if abs(r["rtt_median_ms"] - 2 * delay) > 3:
                failures.append(f"relay RTT {r['rtt_median_ms']:.1f} ms for target {2 * delay} ms")
        (_, free_cpu), (slow_wall, slow_cpu) = spin(lab, None), spin(lab, 0.25)
        # vs the loop's unthrottled CPU time (= its wall time on an idle machine), and its own CPU share
        slowdown, share = slow_wall / free_cpu, slow_cpu / slow_wall
        print(f"cpu quota 0.25: spin loop {slowdown:.2f}x slower than unthrottled, got {share:.0%} of a core")
        if not (2.5 <= slowdown <= 9.0 and 0.18 <= share <= 0.3):
            failures.append(f"cpu quota 0.25: {slowdown:.2f}x slower, {share:.0%} of a core")
        names = (lab.edge_ns, lab.cloud_ns)
    left = [ns for ns in names if ns in _ip("netns", "list").stdout]
    left += [str(p) for p in cpu_cgroup_parent().glob(f"{lab.prefix}*")]
    if left:
        failures.append(f"left behind: {left}")
    print("netlab selftest:", "FAILED\n  " + "\n  ".join(failures) if failures else "ok")
    return 1 if failures else 0


# A CPU-bound loop that prints its wall and CPU seconds (used by the selftest and tests of cpu_quota).
SPIN = (
    "import time\nt, c = time.perf_counter(), time.process_time()\nx = 0\nfor i in range(3_000_000): x += i\n"
    "print(time.perf_counter() - t, time.process_time() - c)"
)


def spin(lab: NetLab, cpu_quota: float | None) -> tuple[float, float]:
    """(wall s, cpu s) of the SPIN loop run in the edge namespace, optionally under a CPU quota."""
    proc = lab.popen(lab.edge_ns, [sys.executable, "-c", SPIN], cpu_quota=cpu_quota, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    wall, cpu = map(float, out.split())
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selftest", action="store_true", help="build a lab, measure it, clean up (needs root)")
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("relay", help="TCP relay adding a one-way delay in each direction")
    p.add_argument("--listen", required=True, help="IP:PORT to listen on (port 0: any free port)")
    p.add_argument("--target", required=True, help="IP:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction (RTT += 2x)")
    p = sub.add_parser("bulk-server", help="(internal) throughput/echo server for NetLab.measure")
    p.add_argument("--listen", required=True)
    p = sub.add_parser("bulk-client", help="(internal) throughput/echo client for NetLab.measure; prints JSON")
    p.add_argument("--target", required=True)
    p.add_argument("--up", type=int, default=0)
    p.add_argument("--down", type=int, default=0)
    p.add_argument("--echoes", type=int, default=0)
    p = sub.add_parser("cleanup", help="remove labs whose creating process is gone")
    p.add_argument("--name", default="cleave")
    args = parser.parse_args(argv)

    if args.selftest:
        return selftest()
    if args.cmd == "relay":
        asyncio.run(serve_relay(args.listen, args.target, args.delay_ms))
    elif args.cmd == "bulk-server":
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stopped with SIGTERM: exit quietly
        with contextlib.suppress(KeyboardInterrupt):
            _bulk_server(args.listen)
    elif args.cmd == "bulk-client":
        print(json.dumps(_bulk_client(args.target, args.up, args.down, args.echoes)))
    elif args.cmd == "cleanup":
        for item in cleanup_stale(args.name):
            print("removed", item)
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
