"""The launcher's side of a multi-node runtime: starting the member node agents, waiting
for them, carrying their output, and ending them.

Member agents (``python -m dragon._nodeagent``, one per node other than the launcher's)
are started by a *start step*: one local process per node for ``--local-nodes`` (each a
node of its own on this host: own index, pool, names and transport endpoint; they talk to
each other only through the transport, as nodes on separate hosts do), or one process that
starts them all (``srun`` with labelled output, ...), or one ``ssh`` per host (see
``dragon._wlm``). Each member reports its transport endpoint (and its name) with a ready
line on its stdout, or why it cannot come up with a failed line; the launcher (the primary
agent, node 0) then dials them all (``Agent.start_primary``). Afterwards a member's stdout and stderr carry
what the processes it started print: the launcher copies them to its own, labelled with
the node when asked.

A stream is read by one thread from start to end, so the ready line and the output after
it are never split between two readers. A stream belongs to one node, or (``labelled``)
carries lines of several nodes, each prefixed ``<task>: `` as ``srun --label`` writes them
(node = task + 1).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time

from dragon import _native

READY = "dragon-node-ready"
# What a member agent writes instead when it cannot come up: ``dragon-node-failed <k> <why>``
# (the start step may go on running the other nodes' agents, so its end would come late).
FAILED = "dragon-node-failed"
# Seconds a start step has to end after SIGTERM before it is killed.
STOP_GRACE = 5.0


class BringUpError(RuntimeError):
    """A node did not come up; the message names it."""


def node_dict(name: str, ip: str) -> dict:
    """This node's entry for the runtime's node table (the agent adds index, endpoint, pid)."""
    from dragon.native.machine import detect_gpus, topology

    topo = topology()
    cpus = topo["cpus"] or sorted(os.sched_getaffinity(0))
    mem = topo["physical_mem"] or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    vendor, gpus = detect_gpus()
    return {
        "name": name,
        "hostname": socket.gethostname(),
        "ip": ip,
        "num_cpus": len(cpus),
        "physical_mem": mem,
        "gpus": list(gpus),
        "gpu_vendor": vendor,
    }


def local_node_name(node: int) -> str:
    """The name of local node ``node``: ``<host>-n<node>``."""
    return f"{socket.gethostname()}-n{node}"


def member_env(rt: int, node: int | None, secret: str, transport: str, timeout: float, **extra: str) -> dict:
    """The environment of a member agent (``node`` None: the start step sets the index)."""
    env = dict(os.environ)
    env.pop("DRAGON_RUNTIME", None)
    env.update(
        DRAGON_NODE_RT=f"{rt:016x}",
        DRAGON_NODE_SECRET=secret,
        DRAGON_TRANSPORT=transport,
        DRAGON_NODE_TIMEOUT=str(timeout),
        **extra,
    )
    if node is not None:
        env["DRAGON_NODE_INDEX"] = str(node)
    return env


class Members:
    """The member agents of nodes 1..n-1 and the processes that started them."""

    def __init__(self, names: dict[int, str], basic: bool = False, verbose: bool = False):
        self.names = names  # node -> name
        self.pids: list[int] = []  # the start step's processes (our children)
        self._pidfds: list[int] = []  # their pidfds, taken at spawn
        self.addresses: dict[int, str] = {}
        self.backends: dict[int, str] = {}  # node -> the transport its endpoint opened
        self.gone: dict[int, str] = {}  # node -> why it cannot come up any more
        self._label = (basic, verbose)
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.netns: Netns | None = None  # the network namespaces of --local-netns
        self._host = socket.gethostname()
        self._lifelines: list[int] = []  # write ends of the step processes' stdin, if given

    def spawn(self, argv: list[str], env: dict, node: int | None, stdin_data: bytes | None = None) -> None:
        """Starts one step process; its output belongs to ``node`` (None: labelled lines).
        ``stdin_data``: written to its standard input, which then stays open until ``stop``
        (its end tells the far side that the launcher is done)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r = in_w = None
        if stdin_data is not None:
            in_r, in_w = os.pipe()
        try:
            pid = _native.spawn(
                argv,
                env=list(env.items()),
                stdin=-3 if in_r is None else in_r,
                stdout=out_w,
                stderr=err_w,
                new_group=True,
                die_with_parent=True,
            )
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd is not None:
                    os.close(fd)
        self.pids.append(pid)
        try:
            # Taken now: the agent reaps every child of the launcher, and a pid reaped and
            # reused must never be signalled at teardown.
            self._pidfds.append(_native.pidfd_open(pid))
        except ProcessLookupError:
            pass
        if in_w is not None:
            self._lifelines.append(in_w)
            t = threading.Thread(target=_write_all, args=(in_w, stdin_data), daemon=True)
            t.start()
        nodes = [node] if node is not None else sorted(self.names)
        for fd, stream, sink in ((out_r, "stdout", sys.stdout.buffer), (err_r, "stderr", sys.stderr.buffer)):
            t = threading.Thread(target=self._read, args=(fd, stream, sink, node, nodes), daemon=True)
            t.start()
            self._threads.append(t)

    def _tag(self, stream: str, node: int) -> bytes:
        basic, verbose = self._label
        if verbose:
            return f"[{stream}: node={self.names.get(node, node)}, host={self._host}] ".encode()
        if basic:
            return f"[{stream}: {self.names.get(node, node)}] ".encode()
        return b""

    def _read(self, fd: int, stream: str, sink, node: int | None, nodes: list[int]) -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                who = node
                if who is None:
                    task, sep, rest = line.partition(b": ")
                    if not sep or not task.strip().isdigit():
                        sink.write(line)
                        sink.flush()
                        continue
                    who, line = int(task) + 1, rest
                if stream == "stdout" and who not in self.addresses and line.startswith(FAILED.encode()):
                    parts = line.decode(errors="replace").split(None, 2)
                    with self._cv:
                        why = parts[2].strip() if len(parts) == 3 and parts[1] == str(who) else "failed"
                        self.gone.setdefault(who, f"exited during bring-up ({why})")
                        self._cv.notify_all()
                    continue
                if stream == "stdout" and who not in self.addresses and line.startswith(READY.encode()):
                    parts = line.decode(errors="replace").split()
                    with self._cv:
                        if len(parts) in (3, 4, 5) and parts[1] == str(who):
                            self.addresses[who] = parts[2]
                            if len(parts) >= 4:  # the node's own name (a WLM's, say)
                                self.names[who] = parts[3]
                            if len(parts) == 5:  # the back end its endpoint opened
                                self.backends[who] = parts[4]
                        else:
                            self.gone[who] = f"reported {line[:200]!r}"
                        self._cv.notify_all()
                    continue
                sink.write(self._tag(stream, who) + line)
                sink.flush()
        if stream == "stdout":
            with self._cv:
                for n in nodes:
                    if n not in self.addresses:
                        self.gone.setdefault(n, "exited during bring-up")
                self._cv.notify_all()

    def wait_ready(self, timeout: float) -> list[tuple[int, str]]:
        """``[(node, endpoint address)]`` once every member reported; BringUpError naming
        every node that exited or did not report within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.addresses) + len(self.gone) < len(self.names):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            failed = [
                f"node {n} ({self.names[n]}) "
                + (self.gone[n] if n in self.gone else f"did not come up within {timeout:g} s")
                for n in sorted(self.names)
                if n not in self.addresses
            ]
        if failed:
            raise BringUpError("; ".join(failed))
        return sorted(self.addresses.items())

    def check_backends(self, mine: str) -> None:
        """BringUpError naming every member whose endpoint opened another transport than
        node 0's ``mine`` (libfabric opened on some nodes and not on others): they could
        not reach each other."""
        odd = [f"node {n} ({self.names[n]}) {b}" for n, b in sorted(self.backends.items()) if b != mine]
        if odd:
            raise BringUpError(
                f"the nodes opened different transports: node 0 {mine}, "
                + ", ".join(odd)
                + " (libfabric could not be opened on some nodes: see their notices; run with"
                " -t tcp, or make the same libfabric provider usable on every node)"
            )

    def stop(self, patience: float) -> None:
        """Closes the step processes' standard input (if given), waits up to ``patience`` s
        for them to exit (the members end their processes and remove their segments when
        the primary ends the runtime), asks the rest to end (SIGTERM: srun and mpiexec pass
        it on to the agents), kills what is left after another ``STOP_GRACE`` s, and lets
        the output readers finish."""
        for fd in self._lifelines:
            os.close(fd)
        self._lifelines = []
        fds, self._pidfds = self._pidfds, []
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = set(fds)
        for sig, grace in ((signal.SIGTERM, patience), (signal.SIGKILL, STOP_GRACE)):
            deadline = time.monotonic() + grace
            while waiting and (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(int(left * 1000) + 1):
                    poller.unregister(fd)
                    waiting.discard(fd)
            for fd in waiting:
                try:
                    signal.pidfd_send_signal(fd, sig)
                except OSError:
                    pass  # ended (and reaped) meanwhile
        for pid in self.pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # the agent reaped it
        for fd in fds:
            os.close(fd)
        for t in self._threads:
            t.join(timeout=1.0)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # the step ended (its exit reports the node)


def start_local(
    rt: int, n: int, secret: str, transport: str, timeout: float, labels: tuple, netns: Netns | None = None
) -> Members:
    """Starts the member agents of local nodes 1..n-1 on this host (each in its own network
    namespace when ``netns`` is given)."""
    m = Members({k: local_node_name(k) for k in range(1, n)}, *labels)
    for k in range(1, n):
        ip = netns.address(k) if netns else "127.0.0.1"
        env = member_env(
            rt, k, secret, transport, timeout, DRAGON_NODE_NAME=local_node_name(k), DRAGON_NODE_IP=ip
        )
        argv = [sys.executable, "-m", "dragon._nodeagent"]
        if netns:
            argv = ["ip", "netns", "exec", netns.name(k), *argv]
        m.spawn(argv, env, k)
    return m


class Netns:
    """Network namespaces for local nodes (``--local-netns``, root only): node k >= 1 lives in
    namespace ``dragon-<rt>-<k>`` whose veth joins a bridge of the root namespace; the bridge
    has ``10.<a>.<b>.1/24`` (this node, the launcher), node k ``10.<a>.<b>.<k+1>``. Nodes
    then reach each other only through their addresses, as separate hosts do (``/dev/shm``
    is still shared: names keep nodes apart). Everything is removed by ``remove`` (and by
    ``dragon-cleanup`` for a runtime whose launcher died)."""

    def __init__(self, rt: int, n: int):
        if n > 250:
            raise ValueError("--local-netns takes at most 250 nodes")
        self.rt, self.n = rt, n
        tag = f"{rt:016x}"[:8]
        self.bridge = f"drb{tag}"
        self._veth = f"drv{tag}"
        self._net = f"10.{150 + rt % 50}.{(rt >> 8) % 250}"
        self.made: list[str] = []

    def name(self, k: int) -> str:
        """The namespace of node ``k``."""
        return f"dragon-{self.rt:016x}-{k}"

    def address(self, k: int) -> str:
        """Node ``k``'s address (node 0: the bridge's)."""
        return f"{self._net}.{k + 1}"

    @staticmethod
    def _ip(*args: str) -> None:
        import subprocess

        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
        if r.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")

    def create(self) -> None:
        """Makes the bridge, the namespaces and their veth pairs (OSError naming the step
        that failed; what was made is removed)."""
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self.made.append("bridge")
            self._ip("addr", "add", f"{self.address(0)}/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for k in range(1, self.n):
                ns, host_end, ns_end = self.name(k), f"{self._veth}h{k}", f"{self._veth}n{k}"
                self._ip("netns", "add", ns)
                self.made.append(ns)
                self._ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
                self._ip("link", "set", host_end, "master", self.bridge)
                self._ip("link", "set", host_end, "up")
                self._ip("link", "set", ns_end, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", ns_end)
                self._ip("-n", ns, "link", "set", ns_end, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Deletes the namespaces (their veth ends, and so the pairs, go with them) and the
        bridge; idempotent."""
        remove_netns(self.rt)


def remove_netns(rt: int) -> int:
    """Removes the namespaces and the bridge of runtime ``rt``; returns how many things went."""
    import subprocess

    prefix = f"dragon-{rt:016x}-"
    n = 0
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        names = []
    for ns in names:
        if ns.startswith(prefix):
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False).returncode == 0:
                n += 1
    bridge = f"drb{rt:016x}"[:11]
    if os.path.exists(f"/sys/class/net/{bridge}"):
        if subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False).returncode == 0:
            n += 1
    return n
