"""The runtime's PMI-1 "simple" service for the MPI ranks of a ``ProcessGroup(pmi=...)``.

MPICH (and Cray PMI-1, Intel MPI) clients find their launcher through ``PMI_PORT``
(``host:port``) and ``PMI_ID``; they then speak lines of ``cmd=... key=value ...``: an
``initack`` handshake (answered with the rank and size), ``init``, ``get_maxes``,
``get_appnum``, ``get_my_kvsname``, ``get_universe_size``, ``put``/``get`` in the group's
key-value space, ``barrier_in`` (``barrier_out`` to every rank once all arrived),
``finalize`` and ``abort``. One server per group start, a thread in the process that owns the
group, listening on this node's address so that ranks on every node of the runtime reach it.
``PMI_process_mapping`` (which ranks share a node, for MPI's shared-memory paths) comes from
the ranks' real placement.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable

from dragon import _log
from dragon._listener import Listener

MAX_LINE = 1 << 16
_KVS_SEQ = itertools.count()


def process_mapping(nodes: list[int]) -> str:
    """``PMI_process_mapping`` for ranks placed on ``nodes`` (rank i on nodes[i]): one
    ``(node, 1, count)`` block per run of consecutive ranks on one node, node ids numbered
    in order of first appearance."""
    ids: dict[int, int] = {}
    blocks = []
    for node, run in itertools.groupby(nodes):
        blocks.append(f"({ids.setdefault(node, len(ids))},1,{len(list(run))})")
    return "(vector," + ",".join(blocks) + ")"


def _parse(line: str) -> dict:
    out = {}
    for word in line.split():
        k, _, v = word.partition("=")
        out[k] = v
    return out


class PMIServer(Listener):
    """The PMI-1 service of one start of a group of ``size`` ranks placed on ``nodes``.
    ``on_abort(rank, code, message)`` runs when a rank calls ``PMI_Abort``."""

    def __init__(self, nodes: list[int], host: str, on_abort: Callable[[int, int, str], None]):
        self.size = len(nodes)
        self.kvsname = f"kvs_dragon_{next(_KVS_SEQ)}"
        self.kvs = {"PMI_process_mapping": process_mapping(nodes)}
        self._on_abort = on_abort
        self._lock = threading.Lock()
        self._waiting: list[socket.socket] = []  # ranks inside barrier_in
        self._send_locks: dict = {}
        self.initialized: set[int] = set()  # ranks that sent init
        self.finalized: set[int] = set()  # ranks that sent finalize
        super().__init__(host, "dragon-pmi", backlog=max(16, self.size))
        self.address = f"{host}:{self.port}"

    def env(self, rank: int) -> dict:
        """The settings rank ``rank`` is started with."""
        return {
            "PMI_PORT": self.address,
            "PMI_ID": str(rank),
            "PMI_RANK": str(rank),
            "PMI_SIZE": str(self.size),
            "PMI_process_mapping": self.kvs["PMI_process_mapping"],
            "PMI_APPNUM": "0",
        }

    def _send(self, conn: socket.socket, line: str) -> None:
        with self._lock:
            lk = self._send_locks.setdefault(conn, threading.Lock())
        with lk:
            conn.sendall(line.encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        rank = -1
        buf = b""
        try:
            while True:
                while b"\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_LINE:
                        _log.error("dragon.pmi", "rank %d: a PMI line too long; closing", rank)
                        return
                line, _, buf = buf.partition(b"\n")
                msg = _parse(line.decode(errors="replace"))
                cmd = msg.get("cmd") or msg.get("mcmd", "")
                if cmd == "initack":
                    rank = int(msg.get("pmiid", "-1"))
                    self._send(conn, "cmd=initack rc=0")
                    self._send(conn, f"cmd=set size={self.size}")
                    self._send(conn, f"cmd=set rank={rank}")
                    self._send(conn, "cmd=set debug=0")
                elif cmd == "init":
                    self.initialized.add(rank)
                    self._send(conn, "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0")
                elif cmd == "get_maxes":
                    self._send(conn, "cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024 rc=0")
                elif cmd == "get_appnum":
                    self._send(conn, "cmd=appnum appnum=0 rc=0")
                elif cmd == "get_my_kvsname":
                    self._send(conn, f"cmd=my_kvsname kvsname={self.kvsname} rc=0")
                elif cmd == "get_universe_size":
                    self._send(conn, f"cmd=universe_size size={self.size} rc=0")
                elif cmd == "put":
                    with self._lock:
                        self.kvs[msg.get("key", "")] = msg.get("value", "")
                    self._send(conn, "cmd=put_result rc=0 msg=success")
                elif cmd == "get":
                    with self._lock:
                        v = self.kvs.get(msg.get("key", ""))
                    if v is None:
                        self._send(conn, "cmd=get_result rc=-1 msg=key_not_found")
                    else:
                        self._send(conn, f"cmd=get_result rc=0 msg=success value={v}")
                elif cmd == "barrier_in":
                    self._barrier(conn)
                elif cmd == "finalize":
                    self.finalized.add(rank)
                    self._send(conn, "cmd=finalize_ack")
                elif cmd == "abort":
                    code = int(msg.get("exitcode", "1") or 1)
                    self._on_abort(rank, code, msg.get("message", ""))
                    return
                else:
                    _log.warning("dragon.pmi", "rank %d: unsupported PMI command %r", rank, cmd)
                    self._send(conn, f"cmd={cmd or 'unknown'}_result rc=-1 msg=unsupported")
        except (OSError, ValueError) as e:
            _log.debug("dragon.pmi", "rank %d: connection ended: %s", rank, e)
        finally:
            with self._lock:
                if conn in self._waiting:
                    self._waiting.remove(conn)
                self._send_locks.pop(conn, None)
            conn.close()

    def _barrier(self, conn: socket.socket) -> None:
        with self._lock:
            self._waiting.append(conn)
            if len(self._waiting) < self.size:
                return
            everyone, self._waiting = self._waiting, []
        for c in everyone:
            try:
                self._send(c, "cmd=barrier_out")
            except OSError:
                pass
