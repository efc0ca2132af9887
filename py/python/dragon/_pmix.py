"""The runtime's PMIx service for the Open MPI ranks of a ``ProcessGroup(pmi=...)``.

Open MPI (4.x and later) finds its launcher through PMIx only. PMIx's wire protocol is
versioned, binary and private to libpmix, so the runtime does not speak it itself: it loads
the system's libpmix (``libpmix.so.2``, Debian's ``libpmix2``) at run time with ``ctypes`` and
acts as a PMIx *host*: it starts the library's server side (``PMIx_server_init``), registers
each group start as a namespace with its job, node and process information, registers every
rank and asks the library for the settings (``PMIx_server_setup_fork``) the rank starts with.
The library answers the ranks; the host is called back for the collective parts (fence),
``PMIx_Abort`` and finalize. The ranks use the same libpmix, so client and server always agree
on the wire.

One server per process, made at the first group that needs it, with remote connections on:
ranks on every node of the runtime connect to it over TCP, as PMI-1 ranks reach the group
owner's PMI-1 service. All ranks are therefore clients of this one server, so a fence needs
no exchange with other servers: its data goes straight back to the library. A PMIx "node" is
a host: emulated nodes of one host share one (they share its memory, which is what Open MPI
asks the node map for).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable

from dragon import _log

PMIX_SUCCESS = 0
PMIX_ERROR = -1
PMIX_ERR_NOT_SUPPORTED = -47
PMIX_OPERATION_SUCCEEDED = -157

# data types (pmix_common.h)
PMIX_BOOL = 1
PMIX_STRING = 3
PMIX_UINT16 = 13
PMIX_UINT32 = 14
PMIX_DATA_ARRAY = 39
PMIX_PROC_RANK = 40
PMIX_INFO = 24

LIBRARIES = ("libpmix.so.2", "/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2")
_NS_SEQ = itertools.count()


class PMIxUnavailable(RuntimeError):
    """libpmix cannot be loaded or its server cannot start."""


class Proc(ctypes.Structure):
    """``pmix_proc_t``: a namespace (256 bytes) and a rank."""

    _fields_ = [("nspace", ctypes.c_char * 256), ("rank", ctypes.c_uint32)]


class DataArray(ctypes.Structure):
    """``pmix_data_array_t``."""

    _fields_ = [("type", ctypes.c_uint16), ("size", ctypes.c_size_t), ("array", ctypes.c_void_p)]


_OP_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)
_MODEX_CB = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
_RELEASE_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_CONNECTED = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(Proc), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
_FINALIZED = _CONNECTED
_ABORT = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.POINTER(Proc),
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(Proc),
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
)
_FENCE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.POINTER(Proc),
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
)


class _Module(ctypes.Structure):
    """``pmix_server_module_t`` (PMIx 4): 28 function pointers, the first four ours."""

    _fields_ = [(f"f{i}", ctypes.c_void_p) for i in range(28)]


class _InfoList:
    """A ``pmix_info_t`` array built with libpmix's own list helpers (so this module never
    depends on the layout of ``pmix_info_t``/``pmix_value_t``)."""

    def __init__(self, lib):
        self._lib = lib
        self._ptr = lib.PMIx_Info_list_start()
        self._keep = []

    def add(self, key: str, value, kind: int) -> None:
        if kind == PMIX_STRING:
            v = ctypes.c_char_p(value.encode())
            self._keep.append(v)
            ref = v  # libpmix copies a string from the pointer itself
        elif kind == PMIX_BOOL:
            ref = ctypes.byref(ctypes.c_bool(value))
        elif kind == PMIX_UINT16:
            ref = ctypes.byref(ctypes.c_uint16(value))
        elif kind in (PMIX_UINT32, PMIX_PROC_RANK):
            ref = ctypes.byref(ctypes.c_uint32(value))
        elif kind == PMIX_DATA_ARRAY:
            ref = ctypes.byref(value)
        else:
            raise ValueError(f"unsupported PMIx type {kind}")
        rc = self._lib.PMIx_Info_list_add(self._ptr, key.encode(), ref, kind)
        if rc != PMIX_SUCCESS:
            raise PMIxUnavailable(f"PMIx_Info_list_add({key}) failed: {rc}")

    def convert(self) -> DataArray:
        """The list as a data array of ``pmix_info_t`` (owned by libpmix, kept for ever)."""
        arr = DataArray()
        rc = self._lib.PMIx_Info_list_convert(self._ptr, ctypes.byref(arr))
        self._lib.PMIx_Info_list_release(self._ptr)
        if rc != PMIX_SUCCESS:
            raise PMIxUnavailable(f"PMIx_Info_list_convert failed: {rc}")
        return arr


def _load():
    err = None
    for name in LIBRARIES:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as e:
            err = e
    else:
        raise PMIxUnavailable(
            f"libpmix is not installed ({err}); Open MPI ranks need it: apt-get install libpmix2"
        )
    lib.PMIx_Info_list_start.restype = ctypes.c_void_p
    lib.PMIx_Info_list_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint16]
    lib.PMIx_Info_list_convert.argtypes = [ctypes.c_void_p, ctypes.POINTER(DataArray)]
    lib.PMIx_Info_list_release.argtypes = [ctypes.c_void_p]
    lib.PMIx_server_init.argtypes = [ctypes.POINTER(_Module), ctypes.c_void_p, ctypes.c_size_t]
    lib.PMIx_server_register_nspace.argtypes = [
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        _OP_CB,
        ctypes.c_void_p,
    ]
    lib.PMIx_server_deregister_nspace.argtypes = [ctypes.c_char_p, _OP_CB, ctypes.c_void_p]
    lib.PMIx_server_deregister_nspace.restype = None
    lib.PMIx_server_register_client.argtypes = [
        ctypes.POINTER(Proc),
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        _OP_CB,
        ctypes.c_void_p,
    ]
    lib.PMIx_server_setup_fork.argtypes = [
        ctypes.POINTER(Proc),
        ctypes.POINTER(ctypes.POINTER(ctypes.c_char_p)),
    ]
    return lib


class _Host:
    """This process's PMIx server (one per process: libpmix allows one) and the namespaces
    registered with it, each a group start."""

    def __init__(self, ip: str):
        self.lib = _load()
        self.lock = threading.Lock()
        self.jobs: dict[bytes, PMIxJob] = {}
        self._held: dict[int, ctypes.Array] = {}  # fence results until libpmix releases them
        self._held_seq = itertools.count(1)
        # ctypes callbacks must outlive the server: kept on the instance
        self._cbs = [
            _CONNECTED(self._connected),
            _FINALIZED(self._finalized),
            _ABORT(self._abort),
            _FENCE(self._fence),
            _RELEASE_CB(self._release),
        ]
        self.module = _Module()
        for i in range(4):
            setattr(self.module, f"f{i}", ctypes.cast(self._cbs[i], ctypes.c_void_p))
        self.tmpdir = tempfile.mkdtemp(prefix="dragon-pmix-")  # mode 0700
        info = _InfoList(self.lib)
        info.add("pmix.srvr.tmpdir", self.tmpdir, PMIX_STRING)  # PMIX_SERVER_TMPDIR
        info.add("pmix.sys.tmpdir", self.tmpdir, PMIX_STRING)  # PMIX_SYSTEM_TMPDIR
        if not ip.startswith("127."):  # ranks on other nodes connect over this address
            info.add("pmix.srvr.remote", True, PMIX_BOOL)  # PMIX_SERVER_REMOTE_CONNECTIONS
            info.add("pmix.tcp.ifinclude", f"{ip}/32", PMIX_STRING)  # PMIX_TCP_IF_INCLUDE
        info.add("pmix.srv.nspace", f"dragon-host-{os.getpid()}", PMIX_STRING)
        info.add("pmix.srv.rank", 0, PMIX_PROC_RANK)
        arr = info.convert()
        rc = self.lib.PMIx_server_init(ctypes.byref(self.module), arr.array, arr.size)
        if rc != PMIX_SUCCESS:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise PMIxUnavailable(f"PMIx_server_init failed with status {rc}")
        atexit.register(self._finalize)

    def _finalize(self) -> None:
        self.lib.PMIx_server_finalize()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _job(self, proc) -> PMIxJob | None:
        with self.lock:
            return self.jobs.get(bytes(proc.contents.nspace).split(b"\0", 1)[0])

    def _connected(self, proc, _obj, _cb, _cbdata):
        job = self._job(proc)
        if job is not None:
            job.connected.add(proc.contents.rank)
        return PMIX_OPERATION_SUCCEEDED

    def _finalized(self, proc, _obj, _cb, _cbdata):
        job = self._job(proc)
        if job is not None:
            job.finalized.add(proc.contents.rank)
        return PMIX_OPERATION_SUCCEEDED

    def _abort(self, proc, _obj, status, msg, _procs, _nprocs, cbfunc, cbdata):
        job = self._job(proc)
        if job is not None:
            text = (msg or b"").decode(errors="replace")
            _log.info(
                "dragon.pmix", "rank %d of %s called PMIx_Abort(%d)", proc.contents.rank, job.nspace, status
            )
            threading.Thread(
                target=job.on_abort, args=(proc.contents.rank, status, text), daemon=True
            ).start()
        if cbfunc:
            _OP_CB(cbfunc)(PMIX_SUCCESS, cbdata)
        return PMIX_SUCCESS

    def _fence(self, _procs, _nprocs, _info, _ninfo, data, ndata, cbfunc, cbdata):
        # every participant is a client of this server: the collected data is the result
        buf = ctypes.create_string_buffer(ctypes.string_at(data, ndata) if ndata else b"", max(ndata, 1))
        key = next(self._held_seq)
        with self.lock:
            self._held[key] = buf
        release = ctypes.cast(self._cbs[4], ctypes.c_void_p)
        _MODEX_CB(cbfunc)(PMIX_SUCCESS, ctypes.addressof(buf), ndata, cbdata, release, key)
        return PMIX_SUCCESS

    def _release(self, key):
        with self.lock:
            self._held.pop(key, None)


_HOST: _Host | None = None
_HOST_LOCK = threading.Lock()


def host(ip: str) -> _Host:
    """This process's PMIx server, started on first use, listening on ``ip`` (this node's
    address in the runtime, which ranks on every node reach). Raises PMIxUnavailable."""
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = _Host(ip)
        return _HOST


def available() -> bool:
    """Whether libpmix can be loaded here."""
    try:
        _load()
        return True
    except PMIxUnavailable:
        return False


class PMIxJob:
    """One group start as a PMIx namespace: ``hosts[i]`` is the host of rank i, ``ip`` the
    address of the server. ``on_abort(rank, code, message)`` runs when a rank calls
    ``PMIx_Abort``."""

    def __init__(self, hosts: list[str], ip: str, on_abort: Callable[[int, int, str], None]):
        self._host = host(ip)
        lib = self._host.lib
        self.size = len(hosts)
        self.nspace = f"dragon-{os.getpid()}-{next(_NS_SEQ)}".encode()
        self.on_abort = on_abort
        self.connected: set[int] = set()  # ranks that called PMIx_Init
        self.finalized: set[int] = set()  # ranks that called PMIx_Finalize
        order = list(dict.fromkeys(hosts))  # hosts in order of first rank
        peers = {h: [r for r, x in enumerate(hosts) if x == h] for h in order}
        info = _InfoList(lib)
        info.add("pmix.univ.size", self.size, PMIX_UINT32)
        info.add("pmix.job.size", self.size, PMIX_UINT32)
        info.add("pmix.max.size", self.size, PMIX_UINT32)
        info.add("pmix.jobid", self.nspace.decode(), PMIX_STRING)
        info.add("pmix.num.nodes", len(order), PMIX_UINT32)
        info.add("pmix.job.napps", 1, PMIX_UINT32)
        info.add("pmix.nmap", "raw:" + ",".join(order), PMIX_STRING)
        ppn = ";".join(",".join(map(str, peers[h])) for h in order)
        info.add("pmix.pmap", "raw:" + ppn, PMIX_STRING)
        keep = []
        for nid, h in enumerate(order):
            node = _InfoList(lib)
            node.add("pmix.hname", h, PMIX_STRING)
            node.add("pmix.nodeid", nid, PMIX_UINT32)
            node.add("pmix.lpeers", ",".join(map(str, peers[h])), PMIX_STRING)
            node.add("pmix.local.size", len(peers[h]), PMIX_UINT32)
            node.add("pmix.node.size", len(peers[h]), PMIX_UINT32)
            node.add("pmix.lldr", peers[h][0], PMIX_PROC_RANK)
            arr = node.convert()
            keep.append(arr)
            info.add("pmix.node.arr", arr, PMIX_DATA_ARRAY)
        for rank, h in enumerate(hosts):
            proc = _InfoList(lib)
            local = peers[h].index(rank)
            proc.add("pmix.rank", rank, PMIX_PROC_RANK)
            proc.add("pmix.lrank", local, PMIX_UINT16)
            proc.add("pmix.nrank", local, PMIX_UINT16)
            proc.add("pmix.nodeid", order.index(h), PMIX_UINT32)
            proc.add("pmix.hname", h, PMIX_STRING)
            proc.add("pmix.appnum", 0, PMIX_UINT32)
            proc.add("pmix.grank", rank, PMIX_PROC_RANK)
            proc.add("pmix.apprank", rank, PMIX_PROC_RANK)
            arr = proc.convert()
            keep.append(arr)
            info.add("pmix.pdata", arr, PMIX_DATA_ARRAY)
        arr = info.convert()
        with self._host.lock:
            self._host.jobs[self.nspace] = self
        done = threading.Event()
        status = []

        def registered(rc, _cbdata):
            status.append(rc)
            done.set()

        cb = _OP_CB(registered)
        rc = lib.PMIx_server_register_nspace(self.nspace, self.size, arr.array, arr.size, cb, None)
        if rc == PMIX_SUCCESS:
            done.wait(30)
            rc = status[0] if status else PMIX_ERROR
        elif rc == PMIX_OPERATION_SUCCEEDED:
            rc = PMIX_SUCCESS
        if rc != PMIX_SUCCESS:
            self.close()
            raise PMIxUnavailable(f"PMIx_server_register_nspace failed with status {rc}")
        self._hosts = hosts
        # Open MPI's files of the ranks on this host (its session directory and shared-memory
        # segments) go to directories of this job, removed when it ends: a rank that is
        # killed (after an abort) leaves them behind otherwise
        self._here = socket.gethostname()
        self._dirs = []
        if self._here in hosts:
            self._dirs = [
                tempfile.mkdtemp(prefix="session-", dir=self._host.tmpdir),
                tempfile.mkdtemp(prefix=f"dragon-pmix-{self.nspace.decode()}-", dir="/dev/shm"),
            ]

    def env(self, rank: int) -> dict:
        """Registers rank ``rank`` and returns the settings it starts with."""
        lib = self._host.lib
        proc = Proc(self.nspace, rank)
        done = threading.Event()
        cb = _OP_CB(lambda rc, _c: done.set())
        rc = lib.PMIx_server_register_client(ctypes.byref(proc), os.getuid(), os.getgid(), None, cb, None)
        if rc == PMIX_SUCCESS:
            done.wait(30)
        elif rc != PMIX_OPERATION_SUCCEEDED:
            raise PMIxUnavailable(f"PMIx_server_register_client failed with status {rc}")
        envp = ctypes.POINTER(ctypes.c_char_p)()
        rc = lib.PMIx_server_setup_fork(ctypes.byref(proc), ctypes.byref(envp))
        if rc != PMIX_SUCCESS:
            raise PMIxUnavailable(f"PMIx_server_setup_fork failed with status {rc}")
        out = {}
        i = 0
        while envp and envp[i]:
            k, _, v = envp[i].decode().partition("=")
            out[k] = v
            i += 1
        out["PMIX_HOSTNAME"] = self._hosts[rank]
        if self._dirs and self._hosts[rank] == self._here:
            out["OMPI_MCA_orte_tmpdir_base"] = self._dirs[0]
            out["OMPI_MCA_btl_vader_backing_directory"] = self._dirs[1]
        # Open MPI 4 takes a process for a singleton (and ignores the PMIx settings) unless
        # its launcher looks like a workload manager that launches ranks directly; these
        # three make its Slurm component see a direct launch
        out["SLURM_JOBID"] = os.environ.get("SLURM_JOBID", str(os.getpid()))
        out["SLURM_STEP_ID"] = os.environ.get("SLURM_STEP_ID", "0")
        out["SLURM_NODELIST"] = os.environ.get("SLURM_NODELIST", ",".join(dict.fromkeys(self._hosts)))
        return out

    def close(self) -> None:
        """Deregisters the namespace (its ranks have ended)."""
        with self._host.lock:
            if self._host.jobs.pop(self.nspace, None) is None:
                return
        done = threading.Event()
        cb = _OP_CB(lambda rc, _c: done.set())
        self._host.lib.PMIx_server_deregister_nspace(self.nspace, cb, None)
        done.wait(10)
        for d in getattr(self, "_dirs", ()):
            shutil.rmtree(d, ignore_errors=True)
