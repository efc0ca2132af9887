"""The fork server of the "dragon" start method, the requester's side (the server itself,
``python -m dragon._zygote_server LISTEN_FD``, is ``dragon._zygote_server``).

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
import signal
import socket
import struct

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
    # Imported here (down the order: _runtime imports nothing of the start method): the
    # zygote server imports this module and must not load the native module its children
    # inherit.
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
    from dragon import _runtime  # as in socket_path

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
            [*interpreter, "-m", "dragon._zygote_server", str(fd)],
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
