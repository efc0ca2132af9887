"""The fork server of the "dragon" start method: ``python -m dragon._zygote_server LISTEN_FD``.

The zygote (see ``dragon._zygote``, the requester's side, for the design and the protocol)
has imported once what every child needs, and forks a child per request; the child takes
on the requester's descriptors, environment, affinity and signal dispositions, then runs
spawn's bootstrap. This module is a program: nothing imports it, so it may preload
``dragon._mp`` (the top of the start method's imports) for its children.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import sys

from dragon._zygote import _CODE, _HDR, _MAX_REQUEST, _PID, MAX_FDS, _read_exactly


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

    import dragon._mp  # noqa: F401  (a program nothing imports: the top of the order, no cycle)

    return _serve(listener)


if __name__ == "__main__":
    child = main(sys.argv[1:])
    if child is not None:
        from multiprocessing.spawn import spawn_main

        sys.argv[1:] = ["--multiprocessing-fork"]  # what spawn_main checks; prepare() sets it
        spawn_main(**child[0]["spawn"])
