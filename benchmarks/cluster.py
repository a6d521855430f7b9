"""A bandwidth-limited cluster of test hosts on one machine (run as root).

    python benchmarks/cluster.py --hosts 4 --rate 1gbit -- \
        torchrun --nnodes={hosts} --node-rank={rank} --nproc-per-node=1 \
            --master-addr={master} --master-port=29500 -m pyg_adaqp.train ...
    python benchmarks/cluster.py --hosts 2 --rate 100mbit --check-rate
    python benchmarks/cluster.py --hosts 4 --rates 1gbit 1gbit 1gbit 100mbit -- ...

Every host is a Linux network namespace with one interface, ``eth0``, at
``10.213.0.<rank + 1>/24``; a veth pair joins it to a bridge that lives in a
namespace of its own, so nothing is added to the machine's own network and
the addresses exist only inside these namespaces.  ``tc tbf`` limits every
link in both directions (the host's ``eth0`` and the bridge's port towards
it), like a switch port of that speed; the bucket holds about 2 ms of
traffic, so messages larger than that are shaped.

The command runs once per host with ``{rank}``, ``{hosts}``, ``{addr}`` and
``{master}`` (host 0's address) filled in, ``GLOO_SOCKET_IFNAME=eth0`` (gloo
would otherwise pick the loopback address of the hostname) and
``OMP_NUM_THREADS=1``.  The whole run is bounded by ``--timeout``; on a
failing host, the time-out, Ctrl-C or SIGTERM every host's processes are
killed.  Everything is torn down at the end and the script checks that no
namespace, link or qdisc of its own is left behind.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

SUBNET = "10.213.0"
RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class ClusterError(RuntimeError):
    """The cluster could not be built, a host failed, or the run timed out."""


class Stopped(BaseException):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) asked the run to stop."""


def stop_on_signals() -> None:
    """Turns Ctrl-C, SIGTERM and SIGHUP into :class:`Stopped`, so the cluster is torn down."""
    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def rate_bits(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as ``100mbit`` or ``1gbit``."""
    m = RATE.match(rate)
    if m is None:
        raise ClusterError(f"rate {rate!r} is not of the form <number><bit|kbit|mbit|gbit>, "
                           f"e.g. 100mbit, 1gbit, 10gbit, or 'none'")
    return float(m.group(1)) * UNIT[m.group(2)]


def check_prerequisites() -> None:
    """Raises a :class:`ClusterError` naming whatever is missing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tc need it: run with sudo)")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            missing.append(f"the '{tool}' command (Debian/Ubuntu package {package})")
    if missing:
        raise ClusterError("benchmarks/cluster.py needs " + "; ".join(missing))


@dataclass
class HostResult:
    """What one host's command did."""
    rank: int
    returncode: int | None   # None: killed at the time-out or on a signal
    output: str
    exited_at: float = 0.0   # time.monotonic() when it exited (or was killed)


class Cluster:
    """Network namespaces ``<prefix>h<rank>`` joined by a bridge in ``<prefix>br``.

    Use as a context manager; leaving it tears everything down and checks
    that nothing is left.

    Args:
        hosts (int): Number of test hosts.
        rate (str or list[str]): Link rate for ``tc tbf`` (``100mbit``,
            ``1gbit``, ...) or ``"none"`` for unlimited links; one for every
            host, or a list with one per host (uneven links: a host's rate
            applies to its link in both directions).
    """

    def __init__(self, hosts: int, rate: str | list[str] = "1gbit"):
        if not 1 <= hosts <= 250:
            raise ClusterError(f"hosts must be in [1, 250], got {hosts}")
        self.hosts = hosts
        self.rates = [rate] * hosts if isinstance(rate, str) else list(rate)
        if len(self.rates) != hosts:
            raise ClusterError(f"{len(self.rates)} rates given for {hosts} hosts: give one "
                               f"rate, or one per host")
        self.rate = self.rates[0] if len(set(self.rates)) == 1 else " ".join(self.rates)
        #: Bits per second of every host's link (None: unlimited).
        self.host_bits = [None if r == "none" else rate_bits(r) for r in self.rates]
        self.bits = None if None in self.host_bits else min(self.host_bits)
        self.prefix = f"adaqp{os.getpid()}"
        self.bridge_ns = f"{self.prefix}br"
        self.host_ns = [f"{self.prefix}h{r}" for r in range(hosts)]

    def addr(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def __enter__(self) -> "Cluster":
        check_prerequisites()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _build(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        _ns(self.bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        _ns(self.bridge_ns, "ip", "link", "set", "br0", "up")
        for r, ns in enumerate(self.host_ns):
            _ip("netns", "add", ns)
            # Created directly inside the two namespaces: the machine's own
            # namespace never sees the pair.
            _ip("link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"h{r}", "netns", self.bridge_ns)
            _ns(self.bridge_ns, "ip", "link", "set", f"h{r}", "master", "br0")
            _ns(self.bridge_ns, "ip", "link", "set", f"h{r}", "up")
            _ns(ns, "ip", "addr", "add", f"{self.addr(r)}/24", "dev", "eth0")
            _ns(ns, "ip", "link", "set", "eth0", "up")
            _ns(ns, "ip", "link", "set", "lo", "up")
            if self.host_bits[r] is not None:
                self._shape(ns, "eth0", r)                 # host -> switch
                self._shape(self.bridge_ns, f"h{r}", r)    # switch -> host

    def _shape(self, ns: str, dev: str, rank: int, verb: str = "add") -> None:
        # A bucket of ~2 ms of traffic (at least 64 KiB, several full-size
        # frames): larger bursts would let whole messages through unshaped.
        burst = max(int(self.host_bits[rank] * 0.002 / 8), 64 * 1024)
        _ns(ns, "tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate", self.rates[rank],
            "burst", str(burst), "latency", "100ms")

    def run(self, command: list[str], timeout: float, env: dict[str, str] | None = None,
            hosts: list[int] | None = None, watch: Callable[[], None] | None = None,
            keep_going: bool = False, check: bool = True) -> list[HostResult]:
        """Runs `command` on every host (or on `hosts`) and waits for all of them.

        The first host to fail, the time-out or a signal kills the others
        (with `keep_going`, a failing host does not: the others run on until
        they exit or the time-out).  `watch` is called about every 50 ms
        while the hosts run, e.g. to inject a fault.  Raises
        :class:`ClusterError` when a host failed or the time ran out (unless
        not `check`); the error carries every host's output.
        """
        ranks = list(range(self.hosts)) if hosts is None else hosts
        procs, logs = {}, {}
        base = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
                **(env or {})}
        for r in ranks:
            fields = {"rank": r, "hosts": self.hosts, "addr": self.addr(r),
                      "master": self.addr(0)}
            argv = [_fill(part, fields) for part in command]
            log = tempfile.TemporaryFile("w+")
            logs[r] = log
            procs[r] = subprocess.Popen(["ip", "netns", "exec", self.host_ns[r], *argv],
                                        stdout=log, stderr=subprocess.STDOUT, env=base,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        failed, timed_out, exited = None, False, {}
        try:
            while len(exited) < len(procs):
                for r, p in procs.items():
                    if r not in exited and p.poll() is not None:
                        exited[r] = time.monotonic()
                        if failed is None and p.returncode != 0:
                            failed = r
                if len(exited) == len(procs):
                    break
                if (failed is not None and not keep_going) or time.monotonic() > deadline:
                    timed_out = time.monotonic() > deadline
                    break
                if watch is not None:
                    watch()
                time.sleep(0.05)
        finally:
            for p in procs.values():
                _kill_group(p)
        now = time.monotonic()
        results = []
        for r, log in logs.items():
            log.seek(0)
            results.append(HostResult(r, procs[r].returncode if r in exited else None,
                                      log.read(), exited.get(r, now)))
            log.close()
        if check and (failed is not None or timed_out or any(h.returncode != 0
                                                             for h in results)):
            why = (f"host {failed} exited with code {procs[failed].returncode}"
                   if failed is not None else f"timed out after {timeout:.0f} s"
                   if timed_out else "a host failed")
            tails = "\n".join(f"--- host {h.rank} (exit {h.returncode}) ---\n{h.output[-3000:]}"
                              for h in results)
            raise ClusterError(f"cluster run failed: {why}\n{tails}")
        return results

    def set_link(self, rank: int, up: bool) -> None:
        """Takes host `rank`'s link down (both directions) or up again, at the switch port."""
        _ns(self.bridge_ns, "ip", "link", "set", f"h{rank}", "up" if up else "down")

    def set_rate(self, rank: int, rate: str) -> None:
        """Changes host `rank`'s link rate (both directions) while it carries traffic."""
        if self.host_bits[rank] is None:
            raise ClusterError(f"host {rank}'s link is unlimited: there is no rate to change")
        self.rates[rank] = rate
        self.host_bits[rank] = rate_bits(rate)
        self._shape(self.host_ns[rank], "eth0", rank, "change")
        self._shape(self.bridge_ns, f"h{rank}", rank, "change")

    def kill_host(self, rank: int) -> None:
        """SIGKILLs every process on host `rank`, as when a machine dies."""
        _kill_namespace(self.host_ns[rank])

    def teardown(self) -> None:
        """Kills every process in the namespaces, deletes them, checks nothing is left."""
        ours = [ns for ns in [*self.host_ns, self.bridge_ns] if ns in _netns_list()]
        for ns in ours:
            _kill_namespace(ns)
        for ns in ours:
            # Deleting a namespace deletes its veth ends and their qdiscs.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        left = self.leftovers()
        if left:
            raise ClusterError("teardown left behind: " + "; ".join(left))

    def leftovers(self) -> list[str]:
        """Namespaces, links or qdiscs of this cluster that still exist."""
        left = [f"namespace {ns}" for ns in _netns_list() if ns.startswith(self.prefix)]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                               text=True).stdout
        left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
                 if self.prefix in line]
        qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
        left += [f"qdisc '{line}'" for line in qdiscs.splitlines()
                 if "tbf" in line and self.prefix in line]
        return left


def _fill(part: str, fields: dict) -> str:
    """Replaces the ``{name}`` placeholders of `fields`, leaving any other braces alone."""
    for name, value in fields.items():
        part = part.replace("{" + name + "}", str(value))
    return part


def _kill_namespace(ns: str) -> None:
    """SIGKILLs every process in network namespace `ns`."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ip(*args: str) -> None:
    _checked(["ip", *args])


def _ns(ns: str, *args: str) -> None:
    _checked(["ip", "netns", "exec", ns, *args])


def _checked(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise ClusterError(f"'{shlex.join(argv)}' failed: {res.stderr.strip()}")


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


RATE_PROBE = r"""
import socket, sys, time
rank, peer, nbytes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if rank == 1:
    srv = socket.create_server(("0.0.0.0", 29400))
    conn, _ = srv.accept()
    got, t0 = 0, None
    while got < nbytes:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        t0 = t0 or time.perf_counter()
        got += len(chunk)
    dt = time.perf_counter() - t0
    print(f"received {got} bytes in {dt:.3f} s: {got * 8 / dt / 1e6:.1f} Mbit/s")
else:
    for _ in range(100):
        try:
            s = socket.create_connection((peer, 29400), timeout=1)
            s.settimeout(None)
            break
        except OSError:
            time.sleep(0.05)
    s.sendall(b"\0" * nbytes)
    s.close()
"""


def measure_rate(cluster: Cluster, seconds: float = 3.0) -> float:
    """Mbit/s of one TCP stream from host 0 to host 1, sending for about `seconds`."""
    if cluster.hosts < 2:
        raise ClusterError("--check-rate needs at least 2 hosts")
    bits = cluster.bits or 10e9
    nbytes = int(bits * seconds / 8)
    res = cluster.run([sys.executable, "-c", RATE_PROBE, "{rank}", cluster.addr(1), str(nbytes)],
                      timeout=30 + 4 * seconds, hosts=[0, 1])
    line = next(h.output for h in res if h.rank == 1).strip().splitlines()[-1]
    return float(line.split(": ")[1].split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=2, help="number of test hosts")
    ap.add_argument("--rate", default="1gbit",
                    help="link rate in both directions (tc syntax: 100mbit, 1gbit) or 'none'")
    ap.add_argument("--rates", nargs="+", metavar="RATE",
                    help="one rate per host instead of --rate (uneven links)")
    ap.add_argument("--timeout", type=float, default=1800, help="bound on the whole run, s")
    ap.add_argument("--check-rate", action="store_true",
                    help="measure one TCP stream from host 0 to host 1 instead of a command")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="after '--': the command per host, with {rank} {hosts} {addr} {master}")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.check_rate:
        ap.error("give a command after '--', or --check-rate")

    stop_on_signals()
    try:
        with Cluster(args.hosts, args.rates or args.rate) as cluster:
            print(f"cluster: {args.hosts} hosts on {SUBNET}.0/24, links at {cluster.rate}",
                  flush=True)
            if args.check_rate:
                print(f"host 0 -> host 1: {measure_rate(cluster):.1f} Mbit/s")
            else:
                for host in cluster.run(command, timeout=args.timeout):
                    print(f"--- host {host.rank} ---\n{host.output}", end="")
        print("teardown check: no namespace, link or qdisc left")
    except Stopped as sig:
        print(f"stopped by {sig}; torn down", file=sys.stderr)
        return 130
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
