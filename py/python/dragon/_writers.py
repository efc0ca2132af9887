"""The writer counts of a process that ends without closing its pipe ends (SIGKILL,
``os._exit``, a crash), given back by its node's agent.

A multi-node ``Pipe`` end that can write counts itself in a native semaphore of its channel
(``dragon._node_conn.Connection``): readers see end of file once the count is zero. A
process that ends normally closes its ends first. One killed cannot, so each process keeps
a file of the counts it holds (``<scratch dir>/writers-<node>/<pid>-<start time>``, one
line ``kind pool r0 r1 r2 r3 count`` per semaphore, rewritten at every change and removed
when empty). Its node's agent looks at these files twice a second: the file of a process
that is gone is read, its counts are taken back as its closes would have (on the
semaphore's own node, through that node's object server), and the file is removed.
Readers then see end of file within their next wait slice, as with descriptors when the
kernel closes a dead process's files.

This module is imported by agents too: it stays light (no multiprocessing, no numpy)."""

from __future__ import annotations

import os
import threading

from dragon import _native, _runtime

_lock = threading.Lock()
_own: dict = {}  # (kind, pool, ref) -> writer handles of this process counted there
_path: str | None = None


def directory(rt: int, node: int) -> str:
    """Where the processes of node ``node`` of runtime ``rt`` keep their files."""
    return os.path.join(_runtime.scratch_path(rt), f"writers-{node}")


def _start_time(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks after boot), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5); 3 is the first after the name
    except (IndexError, ValueError):
        return None


def _my_path() -> str:
    global _path
    if _path is None:
        start = _start_time(os.getpid())
        value = os.environ.get(_runtime.RUNTIME_ENV)
        if start is None or not value:  # no /proc, or no runtime: nobody to tell
            return ""
        rt, node, _ = _runtime.parse_env(value)
        _runtime.scratch_dir(rt)  # made private, or refused
        d = directory(rt, node)
        os.makedirs(d, mode=0o700, exist_ok=True)
        _path = os.path.join(d, f"{os.getpid()}-{start}")
    return _path


def _forget() -> None:
    """A forked child holds none of its parent's counts (its inherited ends count anew)."""
    global _path, _lock
    _own.clear()
    _path = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget)


def note(sem, delta: int) -> None:
    """This process holds ``delta`` more (or fewer) writer counts of ``sem`` (a native
    Semaphore of any node)."""
    kind, pool, ref = sem.__reduce__()[1]
    key = (kind, pool, tuple(ref))
    with _lock:
        n = _own.get(key, 0) + delta
        if n > 0:
            _own[key] = n
        else:
            _own.pop(key, None)
        path = _my_path()
        if not path:
            return
        if not _own:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for (k, p, r), c in _own.items():
                f.write(f"{k} {p} {' '.join(map(str, r))} {c}\n")
        os.replace(tmp, path)


def _take_back(node: int, nodes, kind: str, pool: str, ref: tuple, count: int) -> None:
    """Takes ``count`` units from the writer count (as that many closes would)."""
    owner = int(pool.lstrip("/").split("-")[2])
    if owner == node:
        sem = getattr(_native, kind).attach(pool, ref)
        for _ in range(count):
            sem.acquire(False)
        return
    from dragon._remote import parse_entry

    entry = next((n.get("objects", "") for n in nodes() if n["node"] == owner), "")
    ip, _, ticket, fast = parse_entry(entry)
    for _ in range(count):
        _native.objcall(f"{ip}:{fast}", ticket, "acquire", kind, pool, ref, False)


def sweep(rt: int, node: int, nodes) -> int:
    """Takes back the counts of this node's processes that are gone (``nodes()``: the
    runtime's node dicts, for the object servers of other nodes); returns how many files
    it handled. A count whose semaphore or node is gone has nobody left to tell. Never
    raises: its callers are the agents' main loops."""
    try:
        return _sweep(rt, node, nodes)
    except Exception:
        return 0


def _sweep(rt: int, node: int, nodes) -> int:
    d = directory(rt, node)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    done = 0
    for name in names:
        pid, _, start = name.partition(".")[0].partition("-")
        try:
            alive = _start_time(int(pid)) == int(start)
        except ValueError:
            alive = False
        if alive:
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                lines = f.read().splitlines()
            os.unlink(path)
        except OSError:
            continue
        done += 1
        if name.endswith(".tmp"):
            continue  # the dead process's half-written file (its last full one is read too)
        for line in lines:
            try:
                kind, pool, *rest = line.split()
                ref, count = tuple(int(x) for x in rest[:4]), int(rest[4])
                _take_back(node, nodes, kind, pool, ref, count)
            except Exception:
                pass
    return done


def remove(rt: int, node: int) -> None:
    """Removes node ``node``'s directory of files (its agent's end), and the runtime's
    scratch directory on this host when nothing else is left in it."""
    import shutil

    d = directory(rt, node)
    shutil.rmtree(d, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(d))
    except OSError:
        pass  # other nodes of this host, or the launcher's files: the launcher removes it
