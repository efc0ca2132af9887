"""The fork server of the "dragon" start method: ``python -m dragon._zygote LISTEN_FD``.

A "dragon" child is a fresh interpreter that bootstraps like a "spawn" child. Most of its
start is the same in every child: the interpreter itself, ``site``, ``multiprocessing`` and
``dragon``. The zygote is a process of the runtime (launched by the node agent, so the
agent ends it with the runtime) that has done all that once, and forks a child per request.
The child takes over everything that makes it the requester's child in spawn's sense
before it runs spawn's own bootstrap (``spawn_main``): the requester's environment, its
stdin/stdout/stderr and the descriptors spawn passes (at the numbers the requester uses),
the CPU affinity of the Policy in force, and Python's default signal handlers; the working
directory, ``sys.path``, ``sys.argv`` and ``__main__`` come, as in spawn, from the
preparation data. It ends through the interpreter's normal exit (atexit handlers run).

One zygote serves every process of the runtime that starts children with the same
interpreter, interpreter flags and ``PYTHON*``, locale and ``TZ`` environment (the things
fixed when an interpreter starts); its socket lives in the runtime's private scratch directory, and a
connection's peer must have our uid. A request is one connection: a length-prefixed
pickle and the descriptors (SCM_RIGHTS); the zygote answers the child's pid (8 bytes) and,
once it has reaped the child, its exit code (4 bytes, negative for a signal), which is how
``Popen.poll`` learns it. ``DRAGON_MP_ZYGOTE=0`` turns it off (children are then launched by
the agent as fresh interpreters).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import sys

_HDR = struct.Struct("<I")
_PID = struct.Struct("<q")
_CODE = struct.Struct("<i")
# Longest request and most descriptors one request carries (SCM_MAX_FD is 253).
_MAX_REQUEST = 1 << 24
MAX_FDS = 250
# Environment an interpreter reads once at its start (flags, locale and encodings, time zone).
_STARTUP_ENV = ("PYTHON", "LC_", "LANG", "TZ")
_DEVNULL = -3  # the agent's launch: a standard stream on /dev/null
# How long a requester waits for the zygote to accept it and answer the pid.
ANSWER_TIMEOUT = 30.0


# ----- requester side ------------------------------------------------------------------------


def _key(argv: list[str]) -> str:
    """What an interpreter fixes at its start: the zygote's identity."""
    import hashlib

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_STARTUP_ENV))
    return hashlib.sha256(repr((argv, env)).encode()).hexdigest()[:16]


def socket_path(interpreter: list[str]) -> str:
    """Where the zygote for ``interpreter`` listens (in the runtime's scratch directory)."""
    from dragon import _runtime

    return os.path.join(_runtime.scratch_dir(), f"zygote-{_key(interpreter)}.sock")


def _open_fds() -> list[int]:
    import fcntl

    out = []
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        out.append(fd)
    return out


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(ANSWER_TIMEOUT)  # a stopped zygote is an error, never a hang
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except TimeoutError:
        s.close()
        from dragon.exceptions import DragonOSError  # the error path only (start-up speed)

        msg = f"the dragon zygote at {path} did not accept within {ANSWER_TIMEOUT:.0f} s"
        raise DragonOSError(msg) from None
    except BaseException:
        s.close()
        raise
    return s


def _start(path: str, interpreter: list[str]) -> None:
    """Starts a zygote listening on ``path`` (under the caller's lock on it)."""
    from dragon import _runtime

    try:
        os.unlink(path)  # a zygote that died left it
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lsock.bind(path)
        lsock.listen(64)
        fd = lsock.fileno()
        _runtime.agent().launch(
            [*interpreter, "-m", "dragon._zygote", str(fd)],
            list(os.environ.items()),  # the agent sets the zygote's own DRAGON_PUID
            # Not the requester's streams: the zygote outlives it (a pipe it held would never
            # reach end of file); every child gets its own requester's.
            stdin=_DEVNULL,
            stdout=_DEVNULL,
            stderr=_DEVNULL,
            cpus=None,
            new_group=False,
            fd_map=[(fd, fd)],
        )
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    finally:
        lsock.close()


def _zygote_socket(interpreter: list[str]) -> socket.socket | None:
    """A connection to the zygote for ``interpreter`` (started if none runs), or None when
    there can be none here."""
    import fcntl

    path = socket_path(interpreter)
    if len(os.fsencode(path)) > 107:  # sun_path
        return None
    s = _connect(path)
    if s is not None:
        return s
    lock = os.open(path + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        s = _connect(path)
        if s is None:
            _start(path, interpreter)
            s = _connect(path)
    finally:
        os.close(lock)
    return s


def launch(
    interpreter: list[str],
    fd_numbers: list[int],
    cpus: list[int] | None,
    spawn_args: dict,
) -> tuple[int, socket.socket] | None:
    """Has the zygote for ``interpreter`` fork a "dragon" child that runs
    ``spawn_main(**spawn_args)`` with this process's stdio, environment and the descriptors
    ``fd_numbers`` (same numbers). Returns its pid and the connection its exit code will
    arrive on, or None when no zygote can serve (the caller launches a fresh interpreter)."""
    if os.environ.get("DRAGON_MP_ZYGOTE", "1") == "0":
        return None
    fds = sorted(set(_open_fds()) | set(fd_numbers))
    if len(fds) > MAX_FDS:
        return None
    s = _zygote_socket(interpreter)
    if s is None:
        return None
    try:
        # Not this process's DRAGON_PUID: the child asks the agent for its own.
        env = [(k, v) for k, v in os.environ.items() if k != "DRAGON_PUID"]
        # Signals this process ignores stay ignored across exec: a spawn child inherits them.
        ignored = [int(n) for n in signal.valid_signals() if signal.getsignal(n) == signal.SIG_IGN]
        req = pickle.dumps(
            {"env": env, "cpus": cpus, "fds": fds, "ignored": ignored, "spawn": spawn_args},
            protocol=5,
        )
        buf = _HDR.pack(len(req)) + req
        sent = socket.send_fds(s, [buf], fds)
        if sent < len(buf):
            s.sendall(buf[sent:])
        pid = _PID.unpack(_read_exactly(s.recv, _PID.size))[0]
    except TimeoutError:
        s.close()
        from dragon.exceptions import DragonOSError  # the error path only (start-up speed)

        raise DragonOSError(f"the dragon zygote did not answer within {ANSWER_TIMEOUT:.0f} s") from None
    except (OSError, EOFError):
        s.close()
        return None  # the zygote died: a fresh interpreter it is
    except BaseException:
        s.close()
        raise
    s.settimeout(None)  # blocking again: the exit code is read with os.read
    return pid, s


def _read_exactly(read, n: int) -> bytes:
    """``n`` bytes from ``read`` (a socket's ``recv`` or a descriptor's read); EOFError if
    the other end closes first."""
    buf = b""
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            raise EOFError("the dragon zygote closed the connection")
        buf += chunk
    return buf


def read_exit_code(fd: int) -> int | None:
    """The exit code the zygote sends on connection ``fd`` (waits for it), or None if the
    zygote ended without sending one."""
    try:
        return _CODE.unpack(_read_exactly(lambda k: os.read(fd, k), _CODE.size))[0]
    except (OSError, EOFError):
        return None


# ----- the zygote ----------------------------------------------------------------------------


def _read_request(conn: socket.socket) -> tuple[dict, list[int]] | None:
    conn.settimeout(10.0)  # requesters send at once; never let one stall every other
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS + 3)
        if len(data) < _HDR.size:
            raise EOFError
        n = _HDR.unpack_from(data)[0]
        if n > _MAX_REQUEST:
            raise EOFError
        data = data[_HDR.size :]
        if len(data) < n:
            data += _read_exactly(conn.recv, n - len(data))
        req = pickle.loads(data)
        if len(fds) != len(req["fds"]):
            raise EOFError
        return req, fds
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        return None


def _serve(listener: socket.socket) -> tuple[dict, list[int]]:
    """Forks children on request until the zygote is told to end; returns only in a child,
    with its request and descriptors."""
    uid = os.getuid()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    while True:
        try:
            ready = select.select([listener, r], [], [])[0]
        except InterruptedError:
            continue
        if r in ready:
            try:
                os.read(r, 4096)
            except BlockingIOError:
                pass
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    try:
                        conn.sendall(_CODE.pack(os.waitstatus_to_exitcode(status)))
                    except OSError:
                        pass  # the requester is gone
                    conn.close()
        if listener not in ready:
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[2] != uid:
            conn.close()
            continue
        got = _read_request(conn)
        if got is None:
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _requesters_signals(set(got[0].get("ignored", ())))
            # The zygote's descriptors, detached from their objects (closed by number below).
            own = [c.detach() for c in (listener, conn, *children.values())] + [r, w]
            _become(got[0], got[1], own)
            return got
        for fd in got[1]:
            os.close(fd)
        try:
            conn.sendall(_PID.pack(pid))
        except OSError:
            pass
        children[pid] = conn


def _requesters_signals(ignored: set[int]) -> None:
    """Signal dispositions as a spawn child of the requester has them: what it ignores is
    ignored, everything else is the interpreter's default (SIGINT raises
    KeyboardInterrupt)."""
    for n in signal.valid_signals():
        if n in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            cur = signal.getsignal(n)
            if n in ignored:
                if cur != signal.SIG_IGN:
                    signal.signal(n, signal.SIG_IGN)
            elif n == signal.SIGINT:
                signal.signal(n, signal.default_int_handler)
            elif cur == signal.SIG_IGN:
                signal.signal(n, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def _become(req: dict, fds: list[int], own: list[int]) -> None:
    """In a fresh child: takes on the requester's descriptors, environment and affinity."""
    targets = req["fds"]
    # Out of the way first (the targets may be any numbers, the zygote's own among them).
    base = max([*targets, *fds, *own, 2]) + 1
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
    for fd in {*fds, *own}:
        os.close(fd)
    for fd in (0, 1, 2):
        if fd not in targets:
            try:
                os.close(fd)
            except OSError:
                pass
    for h, t in zip(high, targets, strict=True):
        os.dup2(h, t)  # inheritable, as spawn passes them
        os.close(h)
    os.environ.clear()
    os.environ.update(dict(req["env"]))
    if req["cpus"]:
        os.sched_setaffinity(0, req["cpus"])
    _fresh_stdio()


def _fresh_stdio() -> None:
    """sys.stdout and sys.stderr for the descriptors the child now has, set up as an
    interpreter starting on them would (line-buffered stdout on a terminal)."""
    import io

    for fd, name in ((1, "stdout"), (2, "stderr")):
        old = getattr(sys, "__" + name + "__", None)
        try:
            raw = io.FileIO(fd, "w", closefd=False)
        except OSError:
            setattr(sys, name, None)
            setattr(sys, "__" + name + "__", None)
            continue
        # -u or PYTHONUNBUFFERED (the zygote started with the requester's): no binary buffer.
        unbuffered = bool(getattr(old, "write_through", False))
        stream = io.TextIOWrapper(
            raw if unbuffered else io.BufferedWriter(raw),
            encoding=getattr(old, "encoding", None),
            errors=getattr(old, "errors", None),
            line_buffering=not unbuffered and (fd == 2 or os.isatty(fd)),
            write_through=unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, "__" + name + "__", stream)


def main(argv: list[str]) -> tuple[dict, list[int]] | None:
    listener = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the children and the script
    # What every child needs, imported once here.
    import runpy  # noqa: F401  (prepare() runs the parent's __main__ with it)
    from multiprocessing import resource_tracker, spawn, util  # noqa: F401

    import dragon._mp  # noqa: F401

    return _serve(listener)


if __name__ == "__main__":
    child = main(sys.argv[1:])
    if child is not None:
        from multiprocessing.spawn import spawn_main

        sys.argv[1:] = ["--multiprocessing-fork"]  # what spawn_main checks; prepare() sets it
        spawn_main(**child[0]["spawn"])
