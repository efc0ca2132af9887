"""Which nodes a multi-node runtime spans, and how their member agents are started.

``plan(args)`` reads the launcher's options and environment and returns a :class:`Plan`
(the nodes, node 0 first, and how to start the others), or None for a single-node runtime:

``--local-nodes N``  N node agents on this host (``<host>-n<k>``; see ``_multinode``).
Slurm                inside an allocation (``SLURM_JOB_ID``; ``salloc``/``sbatch``): the nodes
                     of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``.
PBS Pro + PALS       inside a job (``PBS_NODEFILE``): the node file's hosts, each once.
SSH                  ``--hostlist a,b,c`` or ``--hostfile FILE`` (one host a line).

``-w/--wlm`` picks one of slurm, pbs+pals, ssh (an error if its allocation or host list is
missing), ``-N/--nodes K`` uses the first K nodes, ``-s`` forces one node and ``-m`` requires
several. Node 0 is this launcher (the primary agent); it takes the name of the node it runs
on when that node is in the list (``SLURMD_NODENAME`` in a batch script, this host's name
for a host list), else of the list's first node, and every other node gets one member agent
(``python -m dragon._nodeagent``):

Slurm     ONE ``srun`` step with one task per member node (``--label``d output), overlapping
          the job's other steps (``--overlap``, ``--mem=0``, ``--cpu-bind=none``) so the agents
          never take CPUs or memory away from the job's own steps. A member's index is
          ``SLURM_PROCID + 1``, its name ``SLURMD_NODENAME``.
PBS+PALS  ONE ``mpiexec -n K-1 --ppn 1 --hosts ...``; a member's index is ``PALS_RANKID + 1``
          (or ``PMI_RANK + 1``), its name the node file's; the agents label their output
          themselves (``DRAGON_NODE_LABEL``), as ``srun --label`` does.
SSH       one ``ssh`` per member host (``-F`` ``--ssh-config-path``, ``-i`` ``--private-key``,
          BatchMode: never a password prompt), running ``python -m dragon._nodeagent
          --env-stdin`` with this launcher's Python (the same path on every host).

The runtime's secret is never on a command line: srun and mpiexec carry the member's
environment to their tasks (as they do any job environment); ssh carries it on its standard
input as one line of JSON that the agent reads into its environment, keeping the rest of
that stream open as a lifeline (end of file: the launcher is gone, the agent ends).

Addresses: node 0 and every member choose their own address: the first of their interfaces
whose name matches ``--network-prefix`` (a regular expression, as DragonHPC's ``hsn``) or
whose IPv4 address starts with it (``10.128.``), else the one of the default route;
``-p/--port`` is the transport's port on every node (0: any).
"""

from __future__ import annotations

import argparse
import os
import sys

# Every launch imports this module (the parser and the plan), so the modules only a
# multi-node launch needs (re, json, shlex, socket, subprocess, dragon._multinode: ~25 ms)
# are imported where they are used.

WLMS = ("slurm", "pbs+pals", "ssh")
# Variables that describe one host or one login session: not carried to another host by ssh.
_HOST_ONLY = r"^(SSH_.*|DISPLAY|HOSTNAME|HOST|PWD|OLDPWD|SHLVL|_|TERM|TMUX.*|XDG_.*|KRB5CCNAME)$"
# Rank variables a member agent reads its index from: the start step sets them anew.
RANK_VARS = ("SLURM_PROCID", "PALS_RANKID", "PMI_RANK")


class UsageError(ValueError):
    """Options or environment that do not make a runtime (the launcher exits with 2)."""


class Plan:
    """The nodes of a multi-node runtime (node 0, this launcher, first) and how to start the
    member agents of the others."""

    def __init__(
        self,
        kind: str,
        names: list[str],
        port: int = 0,
        prefix: str | None = None,
        ssh: list[str] | None = None,
    ):
        self.kind = kind  # "local", "slurm", "pbs+pals" or "ssh"
        self.names = names
        self.port = port
        self.prefix = prefix
        self.ssh = ssh or []  # ssh options (-F, -i)

    def __repr__(self) -> str:
        return f"Plan({self.kind!r}, {self.names!r}, port={self.port}, prefix={self.prefix!r})"

    def address(self) -> str:
        """Node 0's address."""
        return "127.0.0.1" if self.kind == "local" else node_address(self.prefix)


def add_options(p: argparse.ArgumentParser, count) -> None:
    """The launcher's options for nodes and start steps (``count``: the type of a count)."""
    p.add_argument(
        "-N",
        "--nodes",
        type=count,
        metavar="K",
        help="use the first K nodes of the allocation or host list (default: all)",
    )
    p.add_argument(
        "-w",
        "--wlm",
        choices=WLMS,
        help="how member nodes are started: slurm (inside salloc/sbatch), pbs+pals (inside a "
        "PBS job) or ssh (--hostlist/--hostfile); default: the allocation this runs in",
    )
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hostlist", metavar="A,B,...", help="the hosts of an SSH launch, comma-separated")
    hosts.add_argument("--hostfile", metavar="FILE", help="a file naming the SSH launch's hosts, one a line")
    p.add_argument("--ssh-config-path", metavar="FILE", help="ssh configuration file (ssh -F)")
    p.add_argument("--private-key", metavar="FILE", help="ssh identity file (ssh -i)")
    p.add_argument(
        "-p",
        "--port",
        type=_port,
        default=0,
        help="the transport's TCP port on every node (default 0: any free port)",
    )
    p.add_argument(
        "--network-prefix",
        metavar="PREFIX",
        help="use each node's address on the interface whose name matches this regular expression "
        "(e.g. hsn) or whose IPv4 address starts with it (e.g. 10.128.); default: the default route's",
    )


def _port(v: str) -> int:
    if not v.isdigit() or int(v) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {v!r}")
    return int(v)


def plan(a: argparse.Namespace, env: dict | None = None) -> Plan | None:
    """The multi-node runtime the options ``a`` and the environment ask for, or None for a
    single-node one; UsageError when they contradict each other or name no nodes."""
    env = os.environ if env is None else env
    ssh_hosts = a.hostlist is not None or a.hostfile is not None
    if (a.ssh_config_path or a.private_key) and not (ssh_hosts or a.wlm == "ssh"):
        raise UsageError("--ssh-config-path and --private-key are for an SSH launch (--hostlist/--hostfile)")
    if a.local_netns and (a.local_nodes < 2 or os.geteuid() != 0):
        raise UsageError("--local-netns needs --local-nodes N (N > 1) and root")
    if a.local_nodes > 1:
        if a.wlm or ssh_hosts or a.nodes:
            raise UsageError("--local-nodes runs on this host: not with -w, -N, --hostlist or --hostfile")
        if a.single_node_override:
            raise UsageError("-s and --local-nodes N (N > 1) contradict each other")
        from dragon import _multinode

        names = [_multinode.local_node_name(k) for k in range(a.local_nodes)]
        return Plan("local", names, a.port, a.network_prefix)
    kind = a.wlm
    if kind is None:
        if ssh_hosts:
            kind = "ssh"
        elif env.get("SLURM_JOB_ID"):
            kind = "slurm"
        elif env.get("PBS_NODEFILE"):
            kind = "pbs+pals"
    if ssh_hosts and kind != "ssh":
        raise UsageError(f"--hostlist and --hostfile are for an SSH launch, not -w {kind}")
    if a.single_node_override:
        return None
    if kind is None:
        if a.multi_node_override:
            raise UsageError(
                "-m needs nodes: run inside a Slurm or PBS allocation, give --hostlist/--hostfile, "
                "or use --local-nodes N to run N nodes on this host"
            )
        if a.nodes:
            raise UsageError("-N needs an allocation (Slurm, PBS) or a host list (--hostlist/--hostfile)")
        return None
    names = {"slurm": slurm_nodes, "pbs+pals": pbs_nodes, "ssh": ssh_nodes}[kind](a, env)
    if len(set(names)) != len(names):
        raise UsageError(f"{kind}: a node is named twice: {', '.join(names)}")
    here = _own_name(kind, names, env)
    if here is not None:
        names.remove(here)
        names.insert(0, here)
    if a.nodes:
        if a.nodes > len(names):
            have = f"{len(names)} node(s): {', '.join(names)}"
            raise UsageError(f"-N {a.nodes}: the {kind} allocation has {have}")
        names = names[: a.nodes]
    if len(names) == 1 and not a.multi_node_override:
        return None
    return Plan(kind, names, a.port, a.network_prefix, _ssh_options(a) if kind == "ssh" else [])


def _own_name(kind: str, names: list[str], env) -> str | None:
    """The node of ``names`` this launcher runs on, if it can tell."""
    import socket

    if kind == "slurm":
        me = env.get("SLURMD_NODENAME")
        return me if me in names else None
    host = socket.gethostname()
    for n in names:
        if n == host or n.split(".")[0] == host.split(".")[0]:
            return n
    return None


def slurm_nodes(a, env) -> list[str]:
    """The nodes of the Slurm allocation this runs in."""
    import subprocess

    if not env.get("SLURM_JOB_ID"):
        raise UsageError("-w slurm: not inside a Slurm allocation (no SLURM_JOB_ID; use salloc or sbatch)")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UsageError(f"Slurm job {env['SLURM_JOB_ID']}: no SLURM_JOB_NODELIST")
    try:
        r = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"cannot expand the Slurm node list {nodelist!r}: scontrol: {e}") from None
    names = r.stdout.split()
    if r.returncode != 0 or not names:
        raise UsageError(f"cannot expand the Slurm node list {nodelist!r}: {r.stderr.strip() or 'no nodes'}")
    return names


def pbs_nodes(a, env) -> list[str]:
    """The hosts of the PBS job's node file, each once, in order."""
    path = env.get("PBS_NODEFILE")
    if not path:
        raise UsageError("-w pbs+pals: not inside a PBS job (no PBS_NODEFILE)")
    try:
        with open(path) as f:
            names = list(dict.fromkeys(ln.strip() for ln in f if ln.strip()))
    except OSError as e:
        raise UsageError(f"PBS_NODEFILE {path}: {e.strerror}") from None
    if not names:
        raise UsageError(f"PBS_NODEFILE {path} names no host")
    return names


def ssh_nodes(a, env) -> list[str]:
    """The hosts of --hostlist or --hostfile (blank lines and # comments skipped)."""
    if a.hostlist is not None:
        names = [h.strip() for h in a.hostlist.split(",") if h.strip()]
        where = "--hostlist"
    elif a.hostfile is not None:
        try:
            with open(a.hostfile) as f:
                names = [ln.split("#")[0].strip() for ln in f]
        except OSError as e:
            raise UsageError(f"--hostfile {a.hostfile}: {e.strerror}") from None
        names = [n for n in names if n]
        where = f"--hostfile {a.hostfile}"
    else:
        raise UsageError("-w ssh needs the hosts: --hostlist A,B,... or --hostfile FILE")
    if not names:
        raise UsageError(f"{where} names no host")
    return names


def _ssh_options(a) -> list[str]:
    opts = []
    for flag, what in (("-F", "ssh_config_path"), ("-i", "private_key")):
        path = getattr(a, what)
        if path is not None:
            if not os.path.isfile(path):
                raise UsageError(f"--{what.replace('_', '-')} {path}: no such file")
            opts += [flag, os.path.abspath(path)]
    return opts


def interface_addresses() -> list[tuple[str, str]]:
    """``[(interface, IPv4 address)]`` of this host's interfaces that have one."""
    import fcntl
    import socket
    import struct

    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
            except OSError:
                continue
            out.append((name, socket.inet_ntoa(res[20:24])))
    return out


def node_address(prefix: str | None) -> str:
    """This node's address for the transport: on the interface ``prefix`` names (see the
    module docs), else the default route's. ValueError if ``prefix`` matches nothing."""
    import re

    if not prefix:
        from dragon.native.machine import _local_ip

        return _local_ip()
    try:
        pattern = re.compile(prefix)
    except re.error:
        pattern = re.compile(re.escape(prefix))
    addrs = interface_addresses()
    for name, ip in addrs:
        if pattern.match(name) or ip.startswith(prefix):
            return ip
    have = ", ".join(f"{n} {ip}" for n, ip in addrs) or "none"
    raise ValueError(f"no network interface matches --network-prefix {prefix!r} (interfaces: {have})")


def on_each_member(p: Plan, cmd: list[str]):
    """How to run ``cmd`` once on each of ``p``'s nodes but this one: one argv (a Slurm or
    PALS step over all of them) or, for SSH, a list of argvs (one ``ssh`` per host)."""
    import shlex

    members = p.names[1:]
    if p.kind == "ssh":
        ssh = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *p.ssh]
        return [[*ssh, h, shlex.join(["env", f"DRAGON_CLEANUP_NODE={h}", *cmd])] for h in members]
    if p.kind == "slurm":
        k = len(members)
        return [
            "srun", f"--nodes={k}", f"--ntasks={k}", "--ntasks-per-node=1", f"--nodelist={','.join(members)}",
            "--overlap", "--mem=0", "--cpu-bind=none", "--kill-on-bad-exit=0", "--job-name=dragon-cleanup",
            *cmd,
        ]  # fmt: skip
    return ["mpiexec", "-n", str(len(members)), "--ppn", "1", "--hosts", ",".join(members), *cmd]


def start(p: Plan, rt: int, secret: str, transport: str, timeout: float, labels: tuple, netns=None):
    """Starts the member agents of ``p``'s nodes 1..n-1; returns them (``_multinode.Members``).
    ``netns``: the ``_multinode.Netns`` of a local plan with ``--local-netns``."""
    import json
    import re
    import shlex

    from dragon import _multinode

    if p.kind == "local":
        return _multinode.start_local(rt, len(p.names), secret, transport, timeout, labels, netns)
    m = _multinode.Members({k: n for k, n in enumerate(p.names) if k}, *labels)
    extra = {"DRAGON_NODE_PORT": str(p.port)}
    if p.prefix:
        extra["DRAGON_NETWORK_PREFIX"] = p.prefix
    agent = [sys.executable, "-m", "dragon._nodeagent"]
    members = p.names[1:]
    if p.kind == "ssh":
        for k, host in enumerate(members, 1):
            env = _multinode.member_env(rt, k, secret, transport, timeout, DRAGON_NODE_NAME=host, **extra)
            env = {key: v for key, v in env.items() if not re.match(_HOST_ONLY, key)}
            payload = json.dumps({"env": env, "cwd": os.getcwd()}).encode() + b"\n"
            remote = shlex.join([*agent, "--env-stdin"])
            argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
            m.spawn([*argv, *p.ssh, host, remote], dict(os.environ), k, stdin_data=payload)
        return m
    env = _multinode.member_env(rt, None, secret, transport, timeout, **extra)
    for v in RANK_VARS:
        env.pop(v, None)
    if p.kind == "slurm":
        # The job's memory request would contradict --mem=0 (all of the node's, shared).
        for v in ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_GPU"):
            env.pop(v, None)
        k = len(members)
        argv = [
            "srun",
            f"--nodes={k}",
            f"--ntasks={k}",
            "--ntasks-per-node=1",
            f"--nodelist={','.join(members)}",
            "--label",
            "--overlap",
            "--mem=0",
            "--cpu-bind=none",
            "--export=ALL",
            "--kill-on-bad-exit=0",
            "--job-name=dragon-agents",
        ]
    else:
        env["DRAGON_NODE_NAMES"] = ",".join(p.names)
        env["DRAGON_NODE_LABEL"] = "1"
        argv = ["mpiexec", "-n", str(len(members)), "--ppn", "1", "--hosts", ",".join(members)]
    m.spawn([*argv, *agent], env, None)
    return m
