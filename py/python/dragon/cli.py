"""The ``dragon`` launcher (also ``python -m dragon``) and ``dragon-cleanup``.

``dragon [options] PROG [ARGS...]`` starts a runtime: on this node alone, or over the nodes
of the Slurm, PBS or SSH allocation it runs in or is given (``dragon._wlm``; ``--local-nodes``
emulates nodes on this host). The launcher is the (primary) node
agent (``dragon._native.Agent``): it creates the runtime's node pool
(``/dragon-<rt>-0-pool-1``, whose creator is this launcher: the runtime is alive exactly
while the launcher is) and serves the agent's requests, runs PROG as the driver (with Python unless PROG is an
executable file), forwards SIGINT (when sent to the launcher alone), SIGTERM and SIGHUP to
it, and when it ends, ends every remaining process of the runtime (SIGTERM, then SIGKILL)
and removes the runtime's segments. The exit code is the driver's (128+n after signal n).

``dragon-cleanup`` ends the processes and removes the segments of runtimes whose launcher
is gone (found by the creator of their node pool), and removes Dragon-RS segments whose
creator died; it touches nothing else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from dragon import _log, _native, _wlm, _writers
from dragon._nodecount import NODES_ENV
from dragon._runtime import pool_size, remove_scratch_dir

RUNTIME_ENV = "DRAGON_RUNTIME"
RUNTIME_ENV_VERSION = "1"
_PATIENCE = 2.0


def _version() -> str:
    from dragon import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dragon",
        description="Dragon-RS launcher: runs a Dragon driver script on this node, on every node "
        "of the Slurm or PBS allocation it runs in, on SSH hosts (--hostlist/--hostfile), or on "
        "several local nodes (--local-nodes).",
        allow_abbrev=False,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "-s",
        "--single-node-override",
        action="store_true",
        help="run on this node only, even inside an allocation",
    )
    mode.add_argument(
        "-m",
        "--multi-node-override",
        action="store_true",
        help="multi-node runtime: an error unless there is an allocation, a host list or --local-nodes",
    )
    p.add_argument(
        "--local-nodes",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run N node agents on this host, each a node of its own that talks to the others "
        "only through the transport (for laptops, tests and CI)",
    )
    _wlm.add_options(p, _positive_int)
    p.add_argument(
        "--local-netns",
        action="store_true",
        help="with --local-nodes (as root): each other node in a network namespace of its own, "
        "joined to this one by a bridge, so nodes reach each other only by address",
    )
    p.add_argument(
        "-t",
        "--transport",
        choices=["tcp", "ofi", "hsta"],
        default="tcp",
        help="transport between nodes: tcp (default) or ofi (libfabric; hsta is taken as ofi)",
    )
    p.add_argument(
        "-l",
        "--log-level",
        action="append",
        default=[],
        metavar="LOG_LEVEL",
        help="NONE, DEBUG, INFO, WARNING, ERROR or CRITICAL for the per-node log files, or "
        "DEVICE=LEVEL with DEVICE one of stderr, dragon_file, actor_file (may be repeated); "
        "default: warnings and errors to the files, nothing to stderr",
    )
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--no-label", action="store_true", help="print the driver's output as is (default)")
    lab.add_argument("--basic-label", action="store_true", help="prefix output lines with their stream")
    lab.add_argument(
        "--verbose-label", action="store_true", help="prefix output lines with stream, pid and host"
    )
    p.add_argument("--version", action="version", version=f"dragon-rs {_version()}")
    p.add_argument(
        "prog", metavar="PROG", nargs="?", help="the driver: a Python script, or an executable file"
    )
    p.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER, help="arguments for PROG")
    return p


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _driver_argv(prog: str, args: list[str]) -> list[str]:
    if os.path.isfile(prog) and os.access(prog, os.X_OK) and not prog.endswith(".py"):
        return [os.path.abspath(prog), *args]
    if not os.path.isfile(prog):
        # An executable on PATH (not a script here) runs directly.
        import shutil

        found = shutil.which(prog)
        if found and not prog.endswith(".py"):
            return [found, *args]
        raise FileNotFoundError(prog)
    return [sys.executable, prog, *args]


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z":
            parent[int(d)] = int(rest[1])
    out = []
    for pid in parent:
        p = pid
        while p in parent and p not in (0, 1):
            p = parent[p]
            if p == root:
                out.append(pid)
                break
    return out


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _end_descendants(root: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _descendants(root)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _PATIENCE
        while time.monotonic() < deadline:
            _reap_all()
            if not _descendants(root):
                return
            time.sleep(0.02)
    _reap_all()


def _runtime_segments(rt: int, node: int | None = None) -> list[str]:
    prefix = f"dragon-{rt:016x}-" + ("" if node is None else f"{node}-")
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return []


def _remove_segments(rt: int, node: int | None = None) -> int:
    """Removes the runtime's segments in /dev/shm (only node ``node``'s when given)."""
    n = 0
    for name in _runtime_segments(rt, node):
        try:
            os.unlink(os.path.join("/dev/shm", name))
            n += 1
        except OSError:
            pass
    return n


def _runtime_of_env(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(RUNTIME_ENV.encode() + b"="):
            parts = kv.split(b"=", 1)[1].decode(errors="replace").split(":")
            if len(parts) >= 2 and parts[0] == RUNTIME_ENV_VERSION:
                try:
                    return int(parts[1], 16)
                except ValueError:
                    return None
    return None


def _kill_runtime_processes(rt: int) -> int:
    """SIGKILLs every process of this host whose DRAGON_RUNTIME names runtime ``rt``."""
    n = 0
    me = os.getuid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{d}").st_uid != me:
                continue  # another user's process: never ours to end (even as root)
        except OSError:
            continue
        if _runtime_of_env(int(d)) == rt:
            try:
                os.kill(int(d), signal.SIGKILL)
                n += 1
            except OSError:
                pass
    return n


def _mine(name: str) -> bool:
    """Whether /dev/shm/NAME belongs to this user: another user's segments are never
    judged or removed, even by root."""
    try:
        return os.stat(os.path.join("/dev/shm", name)).st_uid == os.getuid()
    except OSError:
        return False


def _creator_alive(name: str) -> bool:
    """Whether the creator of our segment /dev/shm/NAME still runs (pid + start time)."""
    try:
        return _native.segment_creator(name)[1]
    except (OSError, ValueError):
        return False


def cleanup(quiet: bool = False) -> tuple[int, int]:
    """Ends processes of dead runtimes and removes their segments and segments of dead
    creators. Returns (processes signalled, segments removed)."""
    names = []
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith("dragon-") and _mine(n)]
    except OSError:
        pass
    runtimes: dict[int, bool] = {}
    judged: set[int] = set()
    for n in names:
        parts = n.split("-")
        if len(parts) != 5 or len(parts[1]) != 16:
            continue  # not ours: never touched
        try:
            rt = int(parts[1], 16)
        except ValueError:
            continue
        if parts[3] == "pool" and parts[2] == "0" and parts[4] == "1":
            runtimes[rt] = _creator_alive(n)  # the launcher's node: it decides
            judged.add(rt)
        elif parts[3] == "pool" and parts[4] == "1" and rt not in judged:
            # Only member nodes of this runtime on this host: it lives while one of their
            # agents does (their primary being lost ends them).
            runtimes[rt] = runtimes.get(rt, False) or _creator_alive(n)
        else:
            runtimes.setdefault(rt, True)
    dead = {rt for rt, alive in runtimes.items() if not alive}
    killed = sum(_kill_runtime_processes(rt) for rt in dead)
    removed = 0
    for n in names:
        parts = n.split("-")
        if len(parts) != 5 or len(parts[1]) != 16:
            continue
        try:
            rt = int(parts[1], 16)
        except ValueError:
            continue
        if rt in dead or not _creator_alive(n):
            try:
                os.unlink(os.path.join("/dev/shm", n))
                removed += 1
            except OSError:
                pass
    for rt in dead:
        remove_scratch_dir(rt)
    if dead and os.path.isdir("/var/run/netns"):
        from dragon._multinode import remove_netns

        for rt in dead:
            remove_netns(rt)
    if not quiet:
        import socket

        env = os.environ
        where = env.get("SLURMD_NODENAME") or env.get("DRAGON_CLEANUP_NODE") or socket.gethostname()
        print(f"dragon-cleanup: {where}: ended {killed} process(es), removed {removed} segment(s)")
    return killed, removed


def shm_main() -> int:
    """``dragon-shm``: the shared-memory inspection tool (see ``dragon-shm --help``)."""
    return _native.shm_main(["dragon-shm", *sys.argv[1:]])


def config_main() -> int:
    """``dragon-config``: the transport configuration (``add --ofi-runtime-lib=PATH``, ``show``,
    ``clean``; see ``dragon-config -h``)."""
    return _native.config_main(sys.argv[1:])


def cleanup_main(argv: list[str] | None = None) -> int:
    """``dragon-cleanup``: this node, then every other node of the allocation (Slurm, PBS) or
    host list it runs in (one ``dragon-cleanup --this-node`` per node, started as ``dragon``
    starts its member agents)."""
    p = argparse.ArgumentParser(
        prog="dragon-cleanup",
        description="End dead Dragon-RS runtimes' processes and remove their segments, on this node "
        "and on every node of the allocation or host list it runs in.",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--this-node", action="store_true", help="clean this node only")
    _wlm.add_options(p, _positive_int)
    a = p.parse_args(argv)
    plan = None
    if not a.this_node:
        a.local_nodes, a.local_netns = 0, False
        a.single_node_override, a.multi_node_override = False, False
        try:
            plan = _wlm.plan(a)
        except ValueError as e:
            print(f"dragon-cleanup: {e}", file=sys.stderr)
            return 2
    cleanup(a.quiet)
    if plan is None:
        return 0
    return _cleanup_nodes(plan, a.quiet)


def _cleanup_nodes(plan: _wlm.Plan, quiet: bool) -> int:
    """Runs ``dragon-cleanup --this-node`` on ``plan``'s other nodes; 1 if one failed."""
    import subprocess

    argv = _wlm.on_each_member(plan, [sys.executable, "-m", "dragon.cli", "cleanup", "--this-node"])
    if quiet:
        argv = [*argv, "--quiet"]
    code = 0
    for cmd in argv if isinstance(argv[0], list) else [argv]:
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"dragon-cleanup: {cmd[0]}: {e}", file=sys.stderr)
            code = 1
            continue
        if r.returncode != 0:
            print(f"dragon-cleanup: {' '.join(cmd[:1])} exited with {r.returncode}", file=sys.stderr)
            code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    """``dragon [options] PROG [ARGS...]``."""
    a = _parser().parse_args(argv)
    try:
        _log.parse_levels(a.log_level)
        plan = _wlm.plan(a)  # None: this node only
    except ValueError as e:
        print(f"dragon: {e}", file=sys.stderr)
        return 2
    if not a.prog:
        print("dragon: no program given (usage: dragon [options] PROG [ARGS...])", file=sys.stderr)
        return 2
    try:
        argv_d = _driver_argv(a.prog, a.args)
    except FileNotFoundError:
        print(f"dragon: no such program or script: {a.prog}", file=sys.stderr)
        return 2

    cleanup(quiet=True)  # reclaim runtimes whose launcher was killed
    rt = _native.random_runtime()
    try:
        size = pool_size()
    except ValueError as e:
        print(f"dragon: {e}", file=sys.stderr)
        return 2
    # Every process of the runtime logs to the same directory (one file per node).
    os.environ[_log.DIR_ENV] = os.path.abspath(_log.log_base())
    if a.log_level:
        os.environ[_log.LEVEL_ENV] = ",".join(a.log_level)
    _log.configure(rt, 0)
    _native.set_child_subreaper()
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}
    # Blocked before the agent's thread exists, so that only sigtimedwait below sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    # This launcher is the node agent: it creates the node pool and serves launch, status,
    # id and registry requests on a thread of the native module.
    agent = _native.Agent(rt, 0, size)
    members = None  # the member agents of a multi-node runtime
    node0 = None  # this node's name on a multi-node runtime
    if plan is not None:
        from dragon import _multinode

        node0 = plan.names[0]
        try:
            members = _bring_up(agent, rt, a, plan)
        except (_multinode.BringUpError, OSError, RuntimeError, TimeoutError, ValueError) as e:
            print(f"dragon: {e}", file=sys.stderr)
            _log.error("dragon.launcher", "bring-up failed: %s", e)
            _end_descendants(os.getpid())
            agent.shutdown()
            _remove_segments(rt)
            remove_scratch_dir(rt)
            _name_logs(rt)
            return 1
    env = dict(os.environ)
    env[RUNTIME_ENV] = agent.env_value()
    # How many nodes the runtime has: the "dragon" start method switches to node-crossing
    # objects on several (dragon._mp_nodes), without asking the agent.
    env[NODES_ENV] = str(len(plan.names) if plan is not None else 1)
    # DragonHPC's launcher sets this for the driver; some of its examples pick the "dragon"
    # start method by it.
    env.setdefault("DRAGON_PATCH_MP", "True")
    # As DragonHPC's: the size of the node's default pool, which its examples read.
    env.setdefault("DRAGON_DEFAULT_SEG_SZ", str(pool_size()))
    out_fd = err_fd = None
    label_threads = []
    if a.basic_label or a.verbose_label:
        out_r, out_fd = os.pipe()
        err_r, err_fd = os.pipe()
    try:
        puid, pid = agent.launch(argv_d, list(env.items()), stdout=out_fd, stderr=err_fd, new_group=False)
    except (OSError, ValueError) as e:
        print(f"dragon: cannot start {a.prog}: {e}", file=sys.stderr)
        _log.error("dragon.launcher", "cannot start %s: %s", a.prog, e)
        agent.shutdown()
        _remove_segments(rt)
        remove_scratch_dir(rt)
        _name_logs(rt)
        return 2
    _log.info("dragon.launcher", "runtime %016x: driver %s is p_uid %d, pid %d", rt, argv_d, puid, pid)
    if out_fd is not None:
        import socket
        import threading

        os.close(out_fd)
        os.close(err_fd)
        host = socket.gethostname()

        def pump(fd: int, stream: str, sink) -> None:
            with os.fdopen(fd, "rb") as f:
                for line in f:
                    if a.verbose_label:
                        where = f"node={node0}, " if node0 else ""
                        tag = f"[{stream}: {where}pid={pid}, host={host}] "
                    else:
                        tag = f"[{stream}: {node0}] " if node0 else f"[{stream}] "
                    sink.write(tag.encode() + line)
                    sink.flush()

        for fd, name, sink in ((out_r, "stdout", sys.stdout.buffer), (err_r, "stderr", sys.stderr.buffer)):
            t = threading.Thread(target=pump, args=(fd, name, sink), daemon=True)
            t.start()
            label_threads.append(t)

    code = 1
    try:
        code = _wait_driver(agent, puid, pid, sigs, members, rt)
    finally:
        # However the wait ended, the runtime ends: every node's processes and agents. Each
        # step runs even if one before it failed.
        _log.info("dragon.launcher", "driver exited with code %d; ending the runtime", code)
        steps = []
        if members:
            steps += [agent.cluster_shutdown, lambda: members.stop(2 * _PATIENCE)]
            if members.netns:
                steps.append(members.netns.remove)
        steps.append(lambda: _end_descendants(os.getpid()))
        if members:
            # Processes of this runtime on this host that are not our descendants any more
            # (their node agent died and they were reparented elsewhere) end too.
            steps.append(lambda: _kill_runtime_processes(rt))
        steps += [lambda: [t.join(timeout=1.0) for t in label_threads], _objserver_stop, agent.shutdown]
        steps += [lambda: _remove_segments(rt), lambda: remove_scratch_dir(rt)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 (teardown goes on; the error is reported)
                print(f"dragon: teardown step failed: {e}", file=sys.stderr)
                _log.error("dragon.launcher", "teardown step failed: %s", e)
        _log.debug("dragon.launcher", "runtime %016x ended", rt)
    if code != 0:
        _name_logs(rt)
    return code


def _objserver_stop() -> None:
    from dragon import _objserver

    _objserver.stop()


def _signal(pid: int, sig: int) -> None:
    """Sends ``sig`` to ``pid`` unless it is gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_driver(agent, puid: int, pid: int, sigs: set, members, rt: int) -> int:
    """Waits for the driver, forwarding signals to it and ending it when a node is lost;
    returns the launcher's exit code (the driver's; 128+n after signal n; 1 if a node was
    lost and the driver still exited 0). On several nodes, gives back the pipe writer
    counts of node 0's processes that died without closing their ends (``_writers``)."""
    code = None
    lost: list[int] = []
    while code is None:
        info = signal.sigtimedwait(sigs, 0.5)
        if members:
            _writers.sweep(rt, 0, agent.nodes)
        # Reap every child that ended: the driver (its exit code is ours) and orphans
        # reparented to us as the subreaper, which would stay zombies otherwise.
        agent.reap()
        code = agent.status(puid)
        if members and not lost and agent.lost_nodes():
            lost = agent.lost_nodes()
            names = ", ".join(f"node {k} ({members.names.get(k, '?')})" for k in lost)
            print(f"dragon: {names} was lost; ending the run", file=sys.stderr, flush=True)
            _log.error("dragon.launcher", "%s was lost; ending the run", names)
            _signal(pid, signal.SIGTERM)
        if code is not None or info is None or info.si_signo == signal.SIGCHLD:
            agent.sweep()  # release shared-memory holds of processes that died
            continue
        if info.si_signo == signal.SIGINT:
            if info.si_code == 0:  # SI_USER: sent to the launcher alone, not by the terminal
                _signal(pid, signal.SIGINT)
        else:
            _signal(pid, info.si_signo)
    if code < 0:
        code = 128 - code
    if lost and code == 0:
        code = 1
    return code


def _bring_up(agent, rt: int, a: argparse.Namespace, plan: _wlm.Plan):
    """Starts the member agents of ``plan``'s nodes and joins them with ours (node 0);
    returns them (``_multinode.Members``). Raises BringUpError (or the transport's error)
    naming what failed, after ending the members started so far."""
    from dragon import _multinode, _objserver

    backend = "ofi" if a.transport in ("ofi", "hsta") else "tcp"
    timeout = float(os.environ.get("DRAGON_NODE_TIMEOUT", "30"))
    secret = _native.new_secret()
    labels = (a.basic_label, a.verbose_label)
    netns = None
    ip = plan.address()
    if plan.kind == "local" and a.local_netns:
        netns = _multinode.Netns(rt, len(plan.names))
        netns.create()
        ip = netns.address(0)
    try:
        members = _wlm.start(plan, rt, secret, backend, timeout, labels, netns)
    except BaseException:
        if netns:
            netns.remove()
        raise
    members.netns = netns
    try:
        addrs = members.wait_ready(timeout)
        agent.open_endpoint(backend, secret, f"{ip}:{plan.port}")
        members.check_backends(agent.endpoint_backend())
        me = _multinode.node_dict(plan.names[0], ip)
        me["objects"] = _objserver.start(0, ip)
        agent.start_primary(me, addrs, timeout)
    except BaseException:
        members.stop(0.0)
        if netns:
            netns.remove()
        raise
    n = len(plan.names)
    _log.info("dragon.launcher", "runtime %016x: %d %s nodes up over %s", rt, n, plan.kind, backend)
    return members


def _name_logs(rt: int) -> None:
    """On a failed run: names the runtime's log files on stderr, if anything was logged."""
    files = _log.written_files(rt)
    if files:
        print(f"dragon: runtime logs in {_log.log_dir(rt)}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["cleanup"]:  # what dragon-cleanup runs on the other nodes
        sys.exit(cleanup_main(sys.argv[2:]))
    sys.exit(main())
