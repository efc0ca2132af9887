"""The "dragon" context's message-oriented Pipe and queues (dragon._conn), with real processes."""

import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import queue

import dragon  # noqa: F401  (registers the start method)
import numpy as np
import pytest
from dragon import _conn

CTX = mp.get_context("dragon")


def produce(q, tag, n):
    for i in range(n):
        q.put((tag, i, b"x" * (i % 7) * 1500))  # inline packets and pool blocks (> 4 KiB)


def consume(q, out, n):
    out.put([q.get(timeout=60) for _ in range(n)])


def echo_until_none(conn):
    while (m := conn.recv()) is not None:
        conn.send(m)
    conn.close()


class Unpicklable:
    def __reduce__(self):
        raise TypeError("refuses to be pickled")


def test_put_never_blocks_and_keeps_order_past_the_pipe_capacity():
    # Far more messages than the pipe holds (a packet takes one of its pages): put returns at
    # once each time, the feeder thread sends the overflow, the reader sees them in order.
    q = CTX.Queue()
    n = 3000
    produce(q, "a", n)
    got = [q.get(timeout=60) for _ in range(n)]
    assert [g[1] for g in got] == list(range(n))
    assert all(g[2] == b"x" * (g[1] % 7) * 1500 for g in got)
    assert q.empty() and q.qsize() == 0
    q.close()
    q.join_thread()


def test_many_writers_many_readers_each_message_once():
    q, out = CTX.Queue(), CTX.Queue()
    n = 400
    writers = [CTX.Process(target=produce, args=(q, t, n)) for t in "ab"]
    readers = [CTX.Process(target=consume, args=(q, out, n)) for _ in range(2)]
    for p in writers + readers:
        p.start()
    per_reader = [out.get(timeout=120), out.get(timeout=120)]
    for p in writers + readers:
        p.join(60)
        assert p.exitcode == 0
    got = per_reader[0] + per_reader[1]
    assert sorted((t, i) for t, i, _ in got) == sorted((t, i) for t in "ab" for i in range(n))
    assert all(b == b"x" * (i % 7) * 1500 for _, i, b in got)
    # FIFO: what one reader took from one writer came in that writer's order.
    for mine in per_reader:
        for t in "ab":
            seq = [i for tt, i, _ in mine if tt == t]
            assert seq == sorted(seq)


def test_unpicklable_item_is_reported_and_the_queue_goes_on(capfd):
    q = CTX.Queue()
    q.put(Unpicklable())  # as CPython's feeder: printed, not raised
    q.put("after")
    assert q.get(timeout=10) == "after"
    assert "refuses to be pickled" in capfd.readouterr().err
    assert q.qsize() == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(1)
    with pytest.raises(ValueError, match="is closed"):
        q.get()


def test_bounded_queue_blocks_and_raises_full():
    q = CTX.Queue(2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    assert q.get() == 1 and not q.full()


def test_pipe_round_trips_wait_and_eof():
    a, b = CTX.Pipe()
    p = CTX.Process(target=echo_until_none, args=(b,))
    p.start()
    b.close()
    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: a pool block
    for m in ([1, "two", 3.0], b"\0" * 70000, big):
        a.send(m)
        assert multiprocessing.connection.wait([a], timeout=30) == [a]
        back = a.recv()
        assert (back == m).all() if isinstance(m, np.ndarray) else back == m
    a.send_bytes(pickle.dumps("raw"))  # bytes in, an object out (CPython's wire contract)
    assert pickle.loads(a.recv_bytes()) == "raw"
    a.send(None)
    p.join(30)
    assert p.exitcode == 0
    # Every other end is closed: readable (EOF), then EOFError.
    assert a.poll(5)
    with pytest.raises(EOFError):
        a.recv()


def write_to_received_fd(conn, data):
    # The handle comes in on the duplex end; another one goes back the other way.
    fd = multiprocessing.reduction.recv_handle(conn)
    os.write(fd, data)
    os.close(fd)
    r, w = os.pipe()
    os.write(w, b"back")
    os.close(w)
    multiprocessing.reduction.send_handle(conn, r, os.getppid())
    os.close(r)
    assert conn.recv() == "go"  # messages beside descriptors
    conn.send("done")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_duplex_pipe_ends_pass_descriptors_and_close_all_they_hold(tmp_path):
    before = open_fds()
    a, b = CTX.Pipe()
    assert isinstance(a, _conn.DuplexConnection)
    assert open_fds() == before + 6  # each end: its incoming pipe's read end, the other
    # pipe's write end, its socket for descriptors
    # The read end of each end's incoming pipe is its fileno: readiness follows messages.
    assert multiprocessing.connection.wait([a, b], timeout=0.01) == []
    a.send(1)
    assert multiprocessing.connection.wait([a, b], timeout=10) == [b]
    assert b.recv() == 1
    b.send(2)
    assert multiprocessing.connection.wait([a, b], timeout=10) == [a]
    assert a.recv() == 2
    p = CTX.Process(target=write_to_received_fd, args=(b, b"via fd"))
    p.start()
    path = tmp_path / "out"
    with open(path, "wb") as f:
        multiprocessing.reduction.send_handle(a, f.fileno(), p.pid)
    fd = multiprocessing.reduction.recv_handle(a)
    a.send("go")
    assert a.recv() == "done"
    p.join(30)
    assert p.exitcode == 0
    assert path.read_bytes() == b"via fd"
    assert os.read(fd, 10) == b"back"  # the read end of the child's pipe
    os.close(fd)
    # CPython's own functions on the pipe's fileno: a clear error, not a hang.
    with pytest.raises(OSError):
        _conn._std_send_handle(a, 0, os.getpid())
    n = open_fds()
    a.close()
    assert open_fds() == n - 3
    b.close()
    assert open_fds() == n - 6


def recv_and_reply(conn_of_conns):
    c = conn_of_conns.recv()  # a duplex end that came through another connection
    c.send(("got", c.recv()))


def test_a_duplex_end_travels_through_another_connection():
    a, b = CTX.Pipe()
    x, y = CTX.Pipe()
    p = CTX.Process(target=recv_and_reply, args=(y,))
    p.start()
    x.send(b)  # outside a spawn: its three descriptors go by CPython's resource sharer
    b.close()
    a.send("hello")
    assert a.recv() == ("got", "hello")
    p.join(30)
    assert p.exitcode == 0
    assert a.poll(10)  # every other end is closed: EOF
    with pytest.raises(EOFError):
        a.recv()


def test_one_way_pipe_and_queue_reader_work_with_wait():
    r, w = CTX.Pipe(duplex=False)
    q = CTX.Queue()
    assert multiprocessing.connection.wait([r, q._reader], timeout=0.01) == []
    q.put("q")
    assert multiprocessing.connection.wait([r, q._reader], timeout=10) == [q._reader]
    assert q.get() == "q"
    w.send("r")
    assert multiprocessing.connection.wait([r, q._reader], timeout=10) == [r]
    assert r.recv() == "r"
    with pytest.raises(OSError):
        w.recv()
    with pytest.raises(OSError):
        r.send(1)
    w.close()
    with pytest.raises(EOFError):
        r.recv()


def test_recv_bytes_of_an_object_with_buffers_is_a_loadable_pickle():
    a, b = CTX.Pipe()
    arr = np.arange(100_000)
    a.send(arr)
    assert (pickle.loads(b.recv_bytes()) == arr).all()
    a.send_bytes(b"x" * 10, 2, 3)
    assert b.recv_bytes() == b"xxx"
    a.send_bytes(b"y" * 100)
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(10)


def test_packet_limits_are_checked():
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="packet holds"):
            dragon._native.packet_send(w, False, b"x" * 5000)
        with pytest.raises(ValueError, match="packet holds"):
            dragon._native.packet_send(w, False, b"")
    finally:
        os.close(r)
        os.close(w)
    assert _conn.encode(b"x" * 10, [], _conn.PIPE_PACKET)[0] == 0


def echo_queue(qin, qout, n):
    for _ in range(n):
        qout.put(qin.get(timeout=60))


SMALL_ARRAYS = [
    np.arange(8, dtype=np.float64),
    np.arange(12, dtype=">i4").reshape(3, 4),  # big-endian
    np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    np.array(3.5),  # 0-d
    np.zeros((0, 5), dtype=np.uint8),  # empty
    np.array(["ab", "cde"]),  # unicode
    np.array([True, False]),
    np.array(["2026-12-05"], dtype="datetime64[ns]"),
    np.arange(10)[::2],  # not contiguous: pickled
    np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # structured: pickled
    np.array([1, "x"], dtype=object),  # objects: pickled
    np.arange(4).view(np.matrix),  # a subclass: pickled
    np.arange(512, dtype=np.float64),  # 4 KiB: header and bytes in a pool block
    np.asfortranarray(np.arange(6000, dtype=np.int32).reshape(60, 100)),  # 24 KB, Fortran
    np.array(["2026-12-05"] * 1000, dtype="datetime64[ns]"),  # no buffer format of its own
]


def same_array(x, a):
    """x is what unpickling a gives."""
    y = pickle.loads(pickle.dumps(a, protocol=5))
    return (
        type(x) is type(y)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and x.flags.f_contiguous == y.flags.f_contiguous
        and x.flags.writeable
        and np.array_equal(x, y)
    )


def test_small_arrays_cross_queues_and_pipes_as_pickle_would_bring_them():
    """Small plain arrays travel by value (not pickled); what arrives is what unpickling
    gives: same type, dtype, shape, order, values, writable."""
    qa, qb = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=echo_queue, args=(qa, qb, len(SMALL_ARRAYS)))
    p.start()
    for a in SMALL_ARRAYS:
        qa.put(a)
    for a in SMALL_ARRAYS:
        assert same_array(qb.get(timeout=60), a), a
    p.join(60)
    assert p.exitcode == 0
    x, y = CTX.Pipe()
    p = CTX.Process(target=echo_until_none, args=(y,))
    p.start()
    for a in SMALL_ARRAYS:
        x.send(a)
        assert same_array(x.recv(), a), a
    x.send(None)
    p.join(60)
    assert _conn._nd_packet(SMALL_ARRAYS[0], _conn.PIPE_PACKET)[0] == _conn._NDARRAY
    assert _conn._nd_packet(SMALL_ARRAYS[8], _conn.PIPE_PACKET) is None
    big = _conn._nd_packet(np.zeros(4096, np.uint8), _conn.PIPE_PACKET)  # in a pool block
    assert big[0] == _conn._BLOCK
    _conn.discard(big)
    x.send(SMALL_ARRAYS[2])  # recv_bytes of an array sent by value: its pickle
    assert same_array(pickle.loads(y.recv_bytes()), SMALL_ARRAYS[2])
