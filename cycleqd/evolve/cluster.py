"""A Ray cluster of several nodes on this machine: for dry runs, tests and benchmarks.

:class:`LoopbackCluster` starts a head (``ray start --head``) and nodes (``ray start
--address=HEAD``), each ``--block`` in its own process session, each node with ``--num-cpus`` and a
custom resource ``node<i>`` of its own. Every process is stopped by the PID of its session leader
(``stop``); a node's raylet can be killed by its PID mid-run (``kill_raylet``) and the node
started again (``restart``), as a lost machine would be. ``cycleqd evolve --address`` joins it
like any cluster.

Where the process may create network namespaces (root, iproute2: :func:`netns_available`), every
node, the head included, runs in a namespace of its own (``ip netns add``) with one address on a
private subnet (``10.77.<x>.0/24``): a veth pair joins it to a bridge that lives in one more
namespace of the cluster's (the hub), so nothing of the cluster is in the machine's own network
namespace: its listeners are reachable only from the cluster's namespaces, a killed node's
address goes away with its namespace, and :meth:`LoopbackCluster.remove_files` deletes every
namespace (and with them every veth and the bridge). A driver joins from the head's namespace:
:meth:`LoopbackCluster.command` prefixes a command line with ``ip netns exec HEAD``. Without
network namespaces every node is on 127.0.0.1 with its own ports; Ray's multi-node mode then
listens on all interfaces (``*``), so use that fallback only on a machine behind a firewall.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment of every process of the cluster: several nodes allowed, no usage stats, no token auth,
    no RAY_ADDRESS."""
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 as "refuse to join a second node" on every platform
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS`` (iproute2); raises RuntimeError with its message when ``check`` and it fails."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out


def netns_available() -> str | None:
    """None when this process can create network namespaces and veth pairs, else why not (one line)."""
    import shutil

    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"cqprobe{os.getpid()}"
    try:
        out = _ip("netns", "add", probe, check=False)
        if out.returncode != 0:
            return f"`ip netns add` failed: {out.stderr.strip()}"
        out = _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if out.returncode != 0:
            return f"`ip link add ... type veth` failed: {out.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


def _free_subnet() -> int:
    """``x`` of a 10.77.x.0/24 that no interface of this machine's namespaces uses."""
    used = _ip("-o", "addr", check=False).stdout
    for ns in _ip("netns", "list", check=False).stdout.split():
        if ns.startswith("cq"):
            used += _ip("-n", ns, "-o", "addr", check=False).stdout
    start = os.getpid() % 200
    for k in range(250):
        x = (start + k) % 250 + 1
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.x.0/24 subnet for the cluster's network namespaces")


def session_pids(leader: int) -> list[int]:
    """PIDs of every live process in the session that ``leader`` leads (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == leader:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def stop_sessions(leaders: list[subprocess.Popen], grace: float = 15) -> None:
    """Stop the sessions that ``leaders`` lead, all together, each process by its PID: SIGTERM,
    then SIGKILL to what is left after ``grace`` seconds; returns once every leader is reaped."""

    def left() -> list[int]:
        return [p for leader in leaders for p in session_pids(leader.pid)]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (any(p.poll() is None for p in leaders) or left()):
            time.sleep(0.2)
        if all(p.poll() is not None for p in leaders) and not left():
            break
    for leader in leaders:
        leader.wait()


@dataclass
class Node:
    """One ``ray start --block`` process (its session leader) and the ports it was given."""

    index: int
    cpus: float
    proc: subprocess.Popen | None = None
    ports: list[int] = field(default_factory=list)
    netns: str | None = None  # its network namespace (None: the machine's, on 127.0.0.1)
    ip: str = "127.0.0.1"

    @property
    def resource(self) -> str:
        return f"node{self.index}"


class LoopbackCluster:
    """A head and ``len(node_cpus)`` more nodes on this machine (see the module docstring).

    Args:
        temp_dir: Ray's session folder root (short: socket paths must fit in 107 bytes).
        head_cpus: CPUs the head offers (0: workers only on the nodes).
        node_cpus: CPUs of each further node.
        netns: each node in a network namespace of its own (True), all on 127.0.0.1 (False), or
            namespaces where :func:`netns_available` (None).
    """

    def __init__(self, temp_dir: str | os.PathLike, head_cpus: float = 0, node_cpus: tuple[float, ...] = (1, 1, 1),
                 netns: bool | None = None):
        self.temp_dir = Path(temp_dir)
        self.gcs_port = free_port()
        self.nodes = [Node(0, head_cpus)] + [Node(i + 1, c) for i, c in enumerate(node_cpus)]
        if netns is None:
            netns = netns_available() is None
        self.hub: str | None = None
        if netns:
            tag = f"cq{os.getpid() % 100000}x{id(self) % 1000}"  # short: interface names stay under 16 bytes
            self.hub, subnet = f"{tag}h", _free_subnet()
            for node in self.nodes:
                node.netns, node.ip = f"{tag}n{node.index}", f"10.77.{subnet}.{10 + node.index}"
        self.address = f"{self.nodes[0].ip}:{self.gcs_port}"
        self.env = ray_env()
        self._ray = str(Path(sys.executable).parent / "ray")

    @property
    def namespaces(self) -> list[str]:
        """The network namespaces of the cluster (the hub's and every node's; none on 127.0.0.1)."""
        return [] if self.hub is None else [self.hub] + [n.netns for n in self.nodes]

    def command(self, args: list[str]) -> list[str]:
        """``args`` run where a driver joins the cluster: in the head's namespace (as is, on 127.0.0.1)."""
        return args if self.hub is None else ["ip", "netns", "exec", self.nodes[0].netns, *args]

    def _up_netns(self, node: Node) -> None:
        """Create the hub (bridge) once, and ``node``'s namespace with its address on a veth to the bridge."""
        if self.hub is not None and self.hub not in _ip("netns", "list").stdout.split():
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        ns = node.netns
        _ip("netns", "del", ns, check=False)  # a node started again gets a fresh namespace
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{node.index}", "netns", self.hub)
        _ip("-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", self.hub, "link", "set", f"v{node.index}", "master", "br0", "up")

    def _down_netns(self, node: Node) -> None:
        """Delete ``node``'s namespace (its veth pair goes with it): its address is gone."""
        if node.netns is not None:
            _ip("netns", "del", node.netns, check=False)

    def listening(self) -> list[str]:
        """Every listening TCP socket (``ss -ltnp``) of the cluster's processes and inside its namespaces."""
        pids = set(self.pids())
        host = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
        out = [line for line in host if any(f"pid={p}," in line for p in pids)]
        live = _ip("netns", "list", check=False).stdout.split()
        for ns in self.namespaces:
            if ns in live:
                out += [f"[{ns}] {line}" for line in subprocess.run(
                    ["ip", "netns", "exec", ns, "ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()]
        return out

    def _start(self, node: Node) -> None:
        node.ports = [free_port() for _ in _PORT_FLAGS]
        if node.netns is not None:
            self._up_netns(node)
        prefix = [] if node.netns is None else ["ip", "netns", "exec", node.netns]
        args = [*prefix, self._ray, "start", "--block", f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus:g}",
                f'--resources={{"{node.resource}": 1}}', "--disable-usage-stats",
                *(f"--{flag}={port}" for flag, port in zip(_PORT_FLAGS, node.ports))]
        if node.index == 0:
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                     f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}"]
        else:
            args += [f"--address={self.address}"]
        log = open(self.temp_dir.parent / f"{self.temp_dir.name}-node{node.index}.log", "ab")
        with log:  # `ray start`'s own output, per node, beside the session folder
            node.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def start(self, timeout: float = 240) -> "LoopbackCluster":
        """Start the head, then each node in turn; return once all of them are alive in the cluster."""
        for i in range(len(self.nodes)):
            self.restart(i, timeout)
        return self

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as Ray's state API lists them (empty while the head is not up)."""
        out = subprocess.run(self.command(
            [sys.executable, "-c", "import json, ray; ray.init(address=%r, log_to_driver=False);"
             "print('NODES ' + json.dumps([n for n in ray.nodes() if n['Alive']]))" % self.address]),
            env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return []
        import json

        # Ray may print warnings of its own (a lagging raylet's heartbeats) around the answer
        found = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(found[-1].removeprefix("NODES ")) if found else []

    def wait_nodes(self, n: int, timeout: float = 240) -> list[dict]:
        """Block until ``n`` nodes are alive; raise RuntimeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                return nodes
            time.sleep(1)
        raise RuntimeError(f"the loopback cluster did not reach {n} live nodes in {timeout:.0f}s")

    def raylet_pid(self, i: int) -> int:
        """PID of node ``i``'s raylet (a process of its session)."""
        node = self.nodes[i]
        for pid in session_pids(node.proc.pid):
            try:
                exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if exe.endswith(b"/raylet"):
                return pid
        raise RuntimeError(f"node {i} has no raylet")

    def kill_raylet(self, i: int) -> int:
        """SIGKILL node ``i``'s raylet by its PID, then stop the rest of that node and delete its
        namespace (its address goes away); returns the PID."""
        pid = self.raylet_pid(i)
        os.kill(pid, signal.SIGKILL)
        self._stop(self.nodes[i])
        self._down_netns(self.nodes[i])
        return pid

    def restart(self, i: int, timeout: float = 240, tries: int = 3) -> None:
        """Start node ``i`` (again: new ports, as a replaced machine joining) and wait until it is alive.

        Ray gives a raylet 30 s to register; on a loaded machine it may take longer and
        ``ray start`` exits, so a node that exited is started again (``tries`` times in all).
        """
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        for _ in range(tries):
            self._start(node)
            while time.monotonic() < deadline and node.proc.poll() is None:
                if any(n["Resources"].get(node.resource) for n in self.alive_nodes()):
                    return
                time.sleep(1)
            self._stop(node)
        raise RuntimeError(f"node {i} of the loopback cluster did not come up")

    def pids(self) -> list[int]:
        """Every live process of the cluster."""
        return [p for node in self.nodes if node.proc is not None for p in session_pids(node.proc.pid)]

    def _stop(self, *nodes: Node, grace: float = 15) -> None:
        """Stop ``nodes`` together (see :func:`stop_sessions`)."""
        live = [n for n in nodes if n.proc is not None]
        stop_sessions([n.proc for n in live], grace)
        for n in live:
            n.proc = None

    def stop(self, grace: float = 15) -> None:
        """Stop every node and the head together, each process by its PID: SIGTERM, then SIGKILL
        after ``grace`` seconds (``ray start --block`` ends its processes one after another, which
        takes about 30 s on a 2-core machine)."""
        self._stop(*self.nodes, grace=grace)

    def remove_files(self) -> None:
        """Remove the network namespaces (with their veths and bridge), the session folder and the
        nodes' logs (after :meth:`stop`)."""
        import shutil

        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for node in self.nodes:
            (self.temp_dir.parent / f"{self.temp_dir.name}-node{node.index}.log").unlink(missing_ok=True)

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.remove_files()
