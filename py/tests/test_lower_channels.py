"""DragonHPC's ``dragon.channels`` (Channel, Message, send/receive handles, the file adapters)
over our channels, used from real processes. DragonHPC's own example and unit tests run in
test_lower_dragonhpc.py."""

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading
import time

import dragon  # noqa: F401  (registers the start method)
import dragon.channels as dch
import dragon.managed_memory as dm
import numpy as np
import pytest
from dragon.utils import B64

CTX = mp.get_context("dragon")
_next_uid = [9000 + os.getpid() % 1000 * 50]
HERE = os.path.dirname(os.path.abspath(__file__))


def new_uid():
    _next_uid[0] += 1
    return _next_uid[0]


@pytest.fixture
def pool():
    p = dm.MemoryPool(64 << 20, "channels", new_uid())
    name = p.name.lstrip("/")
    yield p
    p.destroy()
    assert name not in os.listdir("/dev/shm")


def opened(h):
    h.open()
    return h


def echo(ser_in, ser_out, n):
    with dch.Channel.attach(ser_in).recvh() as r, dch.Channel.attach(ser_out).sendh() as s:
        for _ in range(n):
            s.send_bytes(r.recv_bytes(timeout=60))


def test_ping_pong_between_processes(pool):
    a, b = dch.Channel(pool, 1), dch.Channel(pool, 2, capacity=10, block_size=256)
    assert (a.capacity, a.block_size, b.capacity, b.block_size) == (100, 1024, 10, 256)
    assert dch.Channel.serialized_uid(b.serialize()) == 2
    assert dch.Channel.serialized_pool_uid_fname(b.serialize()) == (pool.muid, pool.name)
    p = CTX.Process(target=echo, args=(a.serialize(), b.serialize(), 1000))
    p.start()
    s, r = opened(a.sendh()), opened(b.recvh())
    for i in range(1000):
        payload = i.to_bytes(4, "little") * (1 + i % 300)  # inline and block messages
        s.send_bytes(payload)
        assert r.recv_bytes(timeout=60) == payload
    p.join(60)
    assert p.exitcode == 0
    assert a.num_msgs == b.num_msgs == 0
    s.close()
    r.close()
    a.destroy()
    b.destroy()


def child_with_pickled_objects(ch, pool, q):
    with ch.recvh() as r:
        m = r.recv(timeout=60)
        q.put((pool.muid, m.tobytes(), ch.cuid, ch.capacity))


def test_channel_and_pool_objects_pickle_into_a_child(pool):
    ch = dch.Channel(pool, 21, capacity=7)
    q = CTX.Queue()
    p = CTX.Process(target=child_with_pickled_objects, args=(ch, pool, q))
    p.start()
    with ch.sendh() as s:
        s.send(dch.Message.create_from_mem(pool.alloc_from_bytes(b"small alloc")))
    assert q.get(timeout=60) == (pool.muid, b"small alloc", 21, 7)
    p.join(60)
    assert p.exitcode == 0
    ch.destroy()


def child_recv_messages(ser, q):
    ch = dch.Channel.attach(ser)
    with ch.recvh() as r:
        big = r.recv(timeout=60)
        view = big.bytes_memview()
        q.put((len(view), bytes(view[:4]), bytes(view[-4:])))
        big.destroy()
        copied = r.recv(timeout=60)
        q.put(copied.tobytes()[:8])
        small = r.recv(timeout=60)
        q.put(small.tobytes())


def test_messages_zero_copy_and_copy_on_send(pool):
    ch = dch.Channel(pool, 3)
    q = CTX.Queue()
    p = CTX.Process(target=child_recv_messages, args=(ch.serialize(), q))
    p.start()
    free_before = pool.free_space
    with ch.sendh() as s:
        msg = dch.Message.create_alloc(pool, 8 << 20)
        view = msg.bytes_memview()
        view[:4], view[-4:] = b"head", b"tail"
        s.send(msg, ownership=dch.transfer_ownership_on_send)  # the block itself moves
        with pytest.raises(dch.ChannelError, match="no payload"):
            msg.bytes_memview()
        assert q.get(timeout=60) == (8 << 20, b"head", b"tail")
        mem = pool.alloc(64 << 10)
        mem.get_memview()[:8] = b"original"
        m2 = dch.Message.create_from_mem(mem)
        s.send(m2)  # copy_on_send: the receiver gets a copy
        mem.get_memview()[:8] = b"changed!"
        assert q.get(timeout=60) == b"original"
        s.send(dch.Message.create_from_mem(mem.clone(0, 5)), ownership=dch.transfer_ownership_on_send)
        assert q.get(timeout=60) == b"chang"
        with pytest.raises(dm.DragonMemoryError, match="freed"):
            mem.free()  # transferred: the send freed it
    p.join(60)
    assert p.exitcode == 0
    del view, m2, mem
    assert pool.free_space >= free_before  # every block went back
    ch.destroy()


def test_timeouts_full_and_empty(pool):
    ch = dch.Channel(pool, 4, capacity=2)
    s, r = opened(ch.sendh()), opened(ch.recvh(timeout=0.2))
    s.send_bytes(b"1")
    s.send_bytes(b"2")
    with pytest.raises(dch.ChannelFull):
        s.send_bytes(b"3", blocking=False)
    with pytest.raises(dch.ChannelFull):
        s.send_bytes(b"3", timeout=0)
    t0 = time.monotonic()
    with pytest.raises(dch.ChannelSendTimeout) as e:
        s.send_bytes(b"3", timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, dch.ChannelSendError)
    assert ch.num_msgs == 2 and ch.poll(timeout=0, event_mask=dch.EventType.POLLFULL)
    assert [r.recv_bytes(), r.recv_bytes()] == [b"1", b"2"]
    with pytest.raises(dch.ChannelEmpty):
        r.recv_bytes(blocking=False)
    t0 = time.monotonic()
    with pytest.raises(dch.ChannelRecvTimeout):
        r.recv()  # the handle's default time-out
    assert 0.15 < time.monotonic() - t0 < 5
    assert not ch.poll(timeout=0.05)
    result = dch.PollResult()
    assert ch.poll(event_mask=dch.EventType.POLLSIZE, poll_result=result) and result.value == 0
    with pytest.raises(ValueError):
        r.recv_bytes(timeout=-1)
    ch.destroy()


def blocked_receiver(ser, q):
    with dch.Channel.attach(ser).recvh() as r:
        q.put("ready")
        try:
            r.recv_bytes()
        except dch.ChannelDestroyed as e:
            q.put(f"destroyed: {type(e).__name__}")


def test_use_after_destroy_here_and_in_another_process(pool):
    ch = dch.Channel(pool, 5)
    ser = ch.serialize()
    q = CTX.Queue()
    p = CTX.Process(target=blocked_receiver, args=(ser, q))
    p.start()
    assert q.get(timeout=60) == "ready"
    s = opened(ch.sendh())
    while ch.blocked_receivers == 0:
        time.sleep(0.01)
    ch.destroy()  # wakes the blocked receiver
    assert q.get(timeout=60) == "destroyed: ChannelDestroyed"
    p.join(60)
    assert p.exitcode == 0
    with pytest.raises(dch.ChannelDestroyed):
        s.send_bytes(b"x")
    with pytest.raises(dch.ChannelDestroyed):
        ch.destroy()
    with pytest.raises(dch.ChannelDestroyed):
        _ = ch.num_msgs
    with pytest.raises(dch.ChannelDestroyed):
        ch.sendh().open()
    with pytest.raises(dch.ChannelDestroyed):
        dch.Channel.attach(ser).recvh().open()


def test_handles_and_bad_input(pool):
    ch = dch.Channel(pool, 6)
    s = ch.sendh()
    with pytest.raises(dch.ChannelHandleNotOpenError):
        s.send_bytes(b"x")
    with pytest.raises(dch.ChannelHandleNotOpenError):
        s.close()
    with pytest.raises(NotImplementedError):
        pickle.dumps(s)
    with pytest.raises(dch.ChannelError, match="capacity"):
        dch.Channel(pool, 7, capacity=0)
    with pytest.raises(dch.ChannelError, match="block_size"):
        dch.Channel(pool, 7, block_size=-1)
    with pytest.raises(dch.ChannelError, match="semaphore"):
        dch.Channel(pool, 7, semaphore=True)
    with pytest.raises(TypeError):
        dch.Channel("pool", 7)
    with pytest.raises(dch.ChannelError, match="not a serialized"):
        dch.Channel.attach(b"garbage")
    with pytest.raises(dch.ChannelError, match="hints"):
        dch.Message.create_alloc(pool, 10, hints=-1)
    with pytest.raises(dch.ChannelError, match="allocate"):
        dch.Message.create_alloc(pool, 1 << 40)
    with dch.Channel(pool, 8) as tmp:  # the creator's with-block destroys it
        pass
    with pytest.raises(dch.ChannelDestroyed):
        _ = tmp.num_msgs
    assert dch.SendHandle is dch.ChannelSendH and dch.RecvHandle is dch.ChannelRecvH
    ch.destroy()


def test_channel_outlives_the_object_that_made_it(pool):
    ser = dch.Channel(pool, 9).serialize()  # the creating object is gone at once
    ch = dch.Channel.attach(ser)
    with ch.sendh() as s, ch.recvh() as r:
        s.send_bytes(b"still here")
        assert r.recv_bytes(timeout=5) == b"still here"
    ch.destroy()  # any process's object may destroy it


def many_writer(ser, k):
    ch = dch.Channel.attach(ser)
    for i in range(3):
        with dch.Many2ManyWritingChannelFile(ch) as f:
            pickle.dump({"writer": k, "i": i, "data": np.full(50_000, k)}, f, protocol=5)


def test_many_to_many_files_with_pickle(pool):
    ch = dch.Channel(pool, 10)
    ps = [CTX.Process(target=many_writer, args=(ch.serialize(), k)) for k in range(2)]
    for p in ps:
        p.start()
    got = []
    reader = dch.Many2ManyReadingChannelFile(ch)
    reader.set_adapter_timeout(timeout=60)
    for _ in range(6):
        with reader:
            obj = pickle.load(reader)
        assert (obj["data"] == obj["writer"]).all()
        got.append((obj["writer"], obj["i"]))
    assert sorted(got) == [(k, i) for k in range(2) for i in range(3)]
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    reader.set_adapter_timeout(blocking=False)
    with reader, pytest.raises(dch.ChannelEmpty):
        reader.read(1)
    ch.destroy()


def p2p_writer(ser):
    ch = dch.Channel.attach(ser)
    w = dch.Peer2PeerWritingChannelFile(ch)
    with w:
        pickle.dump(np.arange(1_000_000), w, protocol=5)  # spans several messages
        w.write_raw_header(11)
        w.write(b"raw payload")
        w.write_eot()


def test_peer_to_peer_stream_with_framing(pool):
    ch = dch.Channel(pool, 11)
    p = CTX.Process(target=p2p_writer, args=(ch.serialize(),))
    p.start()
    r = dch.Peer2PeerReadingChannelFile(ch)
    with r:
        assert r.check_header() == (dch.ChannelAdapterMsgTypes.PICKLE_PROT_5, None)
        assert (pickle.load(r) == np.arange(1_000_000)).all()
        assert r.check_header() == (dch.ChannelAdapterMsgTypes.RAW_BYTES, 11)
        r.advance_raw_header(11)
        assert r.read(11) == b"raw payload"
        assert r.check_header() == (dch.ChannelAdapterMsgTypes.EOT, None)
    p.join(60)
    assert p.exitcode == 0
    ch.destroy()


def test_threads_share_a_channel(pool):
    ch = dch.Channel(pool, 12, capacity=4)
    out = []

    def consume():
        with ch.recvh() as r:
            for _ in range(200):
                out.append(r.recv_bytes(timeout=30))

    t = threading.Thread(target=consume)
    t.start()
    with ch.sendh() as s:
        for i in range(200):
            s.send_bytes(str(i).encode(), timeout=30)
    t.join(60)
    assert out == [str(i).encode() for i in range(200)]
    ch.destroy()


LOCAL = """
import sys
import dragon.channels as dch
from dragon.utils import B64
ch = dch.Channel.make_process_local(capacity=5)
print(B64.bytes_to_str(ch.serialize()), ch.capacity, flush=True)
sys.stdin.readline()
"""


def test_process_local_channel_goes_with_its_process():
    dm.MemoryPool.attach_default()  # the runtime is up: the child joins it
    p = subprocess.Popen(
        [sys.executable, "-c", LOCAL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    ser, cap = p.stdout.readline().split()
    assert cap == "5"
    ch = dch.Channel.attach(B64.str_to_bytes(ser))
    with ch.sendh() as s:
        s.send_bytes(b"while it lives")
    p.communicate("\n", timeout=60)
    assert p.returncode == 0
    with pytest.raises(dch.ChannelDestroyed):
        ch.sendh().open()  # its creator's exit closed it
