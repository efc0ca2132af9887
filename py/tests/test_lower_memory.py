"""DragonHPC's ``dragon.managed_memory`` (MemoryPool, MemoryAlloc) over our pools, used from
real processes ("dragon" start method children and plain subprocesses)."""

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import time

import dragon  # noqa: F401  (registers the start method)
import dragon.managed_memory as dm
import pytest
from dragon.infrastructure.parameters import this_process
from dragon.utils import B64

CTX = mp.get_context("dragon")
_next_uid = [7000 + os.getpid() % 1000 * 50]


def new_uid():
    _next_uid[0] += 1
    return _next_uid[0]


def shm_name(pool):
    return pool.name.lstrip("/")


@pytest.fixture
def pool():
    p = dm.MemoryPool(8 << 20, "test-pool", new_uid())
    yield p
    try:
        p.destroy()
    except dm.DragonPoolError:
        pass  # the test destroyed it


def child_reads_and_writes(pool_ser, mem_ser, q):
    p = dm.MemoryPool.attach(pool_ser)
    m = dm.MemoryAlloc.attach(mem_ser)
    view = m.get_memview()
    q.put((p.muid, m.size, bytes(view[:5])))
    view[:5] = b"WORLD"
    mine = p.alloc(1000)
    mine.get_memview()[:3] = b"new"
    q.put(mine.serialize())  # this process ends; the allocation stays until freed


def test_pool_and_alloc_shared_with_a_child(pool):
    assert pool.size >= 8 << 20 and pool.free_space == pool.size and pool.utilization == 0.0
    m = pool.alloc(4096)
    assert m.size == 4096 and pool.free_space < pool.size and 0 < pool.utilization < 100
    m.get_memview()[:5] = b"hello"
    q = CTX.Queue()
    p = CTX.Process(target=child_reads_and_writes, args=(pool.serialize(), m.serialize(), q))
    p.start()
    assert q.get(timeout=60) == (pool.muid, 4096, b"hello")
    theirs = dm.MemoryAlloc.attach(q.get(timeout=60))
    p.join(60)
    assert p.exitcode == 0
    assert bytes(m.get_memview()[:5]) == b"WORLD"  # the same bytes, not a copy
    assert bytes(theirs.get_memview()[:3]) == b"new"  # outlived its creator
    theirs.free()
    m.free()
    with pytest.raises(dm.DragonMemoryError, match="freed"):
        m.get_memview()


def child_unpickles(blob, q):
    pool, mem = pickle.loads(blob)
    q.put((pool.muid, bytes(mem.get_memview())))


def test_pool_and_alloc_pickle_into_a_child(pool):
    m = pool.alloc_from_bytes(b"pickled bytes")
    q = CTX.Queue()
    p = CTX.Process(target=child_unpickles, args=(pickle.dumps((pool, m)), q))
    p.start()
    assert q.get(timeout=60) == (pool.muid, b"pickled bytes")
    p.join(60)
    assert p.exitcode == 0
    m.free()


SUBPROCESS = """
import sys
import dragon.managed_memory as dm
from dragon.utils import B64
m = dm.MemoryAlloc.attach(B64.str_to_bytes(sys.argv[1]))
print(bytes(m.get_memview()).decode())
m.get_memview()[:] = b"from a subprocess!"
m.free()
"""


def test_serialized_alloc_through_a_subprocess_command_line(pool):
    m = pool.alloc_from_bytes(b"hi from the parent")
    r = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, B64.bytes_to_str(m.serialize())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hi from the parent"
    assert bytes(m.get_memview()) == b"from a subprocess!"  # the same bytes (freed there now)
    with pytest.raises(dm.DragonMemoryError, match="freed already"):
        m.free()


def test_clone_clear_copy_and_identity(pool):
    m = pool.alloc_from_bytes(bytes(range(100)))
    c = m.clone(10, 20)
    assert c.size == 20 and bytes(c.get_memview()) == bytes(range(10, 30))
    c.clear()
    assert bytes(m.get_memview()[10:30]) == bytes(20)
    again = dm.MemoryAlloc.attach(c.serialize())
    assert again == c and again.is_the_same_as(c) and hash(again) == hash(c) and again != m
    other = dm.MemoryPool(1 << 20, "other", new_uid())
    try:
        d = m.copy(other)
        assert bytes(d.get_memview()) == bytes(m.get_memview()) and d.pool.muid == other.muid
        d.free()
    finally:
        other.destroy()
    with pytest.raises(dm.DragonPoolError, match="outside"):
        m.clone(90, 20)
    with pytest.raises(RuntimeError):
        m.clone(-1)
    with pytest.raises(TypeError):
        m.clone("1")
    assert m.pool.muid == pool.muid
    m.free()


def test_bad_input_is_a_clear_error(pool):
    with pytest.raises(dm.DragonPoolCreateFail, match="taken"):
        dm.MemoryPool(1 << 20, "dup", pool.muid)
    with pytest.raises(dm.DragonPoolCreateFail, match="GPU"):
        dm.MemoryPool(1 << 20, "gpu", new_uid(), gpu_memory=True)
    with pytest.raises(dm.DragonPoolCreateFail):
        dm.MemoryPool(1 << 20, "negative", -1)
    with pytest.raises(TypeError):
        dm.MemoryPool("big", "x", new_uid())
    with pytest.raises(TypeError):
        pool.alloc(1.5)
    with pytest.raises(RuntimeError):
        pool.alloc(-1)
    with pytest.raises(dm.DragonMemoryError, match="AllocType"):
        pool.alloc(10, alloc_type=3)
    assert pool.alloc(10, alloc_type=dm.AllocType.DATA).size == 10
    with pytest.raises(dm.DragonPoolAllocationNotAvailable):
        pool.alloc(64 << 20)
    with pytest.raises(dm.DragonPoolAttachFail):
        dm.MemoryPool.attach(b"not a pool")
    with pytest.raises(ValueError):
        dm.MemoryPool.attach(b"")
    with pytest.raises(dm.DragonMemoryTypeError):
        dm.MemoryAlloc.attach(b"drs1:pool:/x")
    with pytest.raises(ValueError):
        pool.alloc_blocking(10, timeout=-1)
    assert issubclass(dm.DragonPoolCreateFail, dm.DragonPoolError)
    assert issubclass(dm.DragonPoolError, dm.DragonMemoryError)
    assert issubclass(dm.DragonMemoryError, dragon.DragonError)


def free_later(mem_ser, delay):
    time.sleep(delay)
    dm.MemoryAlloc.attach(mem_ser).free()


def test_alloc_blocking_times_out_then_waits_for_room(pool):
    big = pool.alloc(pool.free_space - (1 << 20))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        pool.alloc_blocking(2 << 20, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    ser = big.serialize()
    big.detach()  # the allocation stays (only free ends it)
    p = CTX.Process(target=free_later, args=(ser, 0.3))
    p.start()
    m = pool.alloc_blocking(2 << 20, timeout=30)  # room once the child freed `big`
    assert m.size == 2 << 20
    p.join(60)
    assert p.exitcode == 0
    m.free()


def test_destroy_removes_the_segment_and_ends_the_pool():
    p = dm.MemoryPool(1 << 20, "gone", new_uid())
    name, ser = shm_name(p), p.serialize()
    m = p.alloc_from_bytes(b"still mapped")
    assert name in os.listdir("/dev/shm")
    p.destroy()
    assert name not in os.listdir("/dev/shm")
    assert bytes(m.get_memview()) == b"still mapped"  # mappings stay valid
    with pytest.raises(dm.DragonPoolError, match="destroyed"):
        p.alloc(10)
    with pytest.raises(dm.DragonPoolError, match="destroyed"):
        p.destroy()
    with pytest.raises(dm.DragonPoolAttachFail):
        dm.MemoryPool.attach(ser)
    # The same m_uid can be made again; the old handle never removes the new name.
    again = dm.MemoryPool(1 << 20, "again", p.muid)
    del m
    assert name in os.listdir("/dev/shm")
    again.destroy()
    assert name not in os.listdir("/dev/shm")


def test_default_pool_and_serialized_uid():
    d = dm.MemoryPool.attach(B64.str_to_bytes(this_process.default_pd))
    assert d.muid == dm.MemoryPool.attach_default().muid == 1 and d.is_local
    m = d.alloc(100)
    assert m.pool.muid == 1
    m.free()
    assert dm.MemoryPool.serialized_uid_fname(d.serialize()) == (1, d.name)
    assert B64.from_str(B64.bytes_to_str(b"\x00\xffxyz")).decode() == b"\x00\xffxyz"
    with pytest.raises(ValueError):
        B64.str_to_bytes("@@@")


LOCAL = """
import os, sys
import dragon.managed_memory as dm
p = dm.MemoryPool.make_process_local("mine", 1 << 20)
print(p.name.lstrip("/"), flush=True)
sys.stdin.readline()
"""


def test_process_local_pool_goes_with_its_process():
    dm.MemoryPool.attach_default()  # the runtime is up: the child joins it
    p = subprocess.Popen(
        [sys.executable, "-c", LOCAL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    name = p.stdout.readline().strip()
    assert name.startswith("dragon-") and name in os.listdir("/dev/shm")
    p.communicate("\n", timeout=60)
    assert p.returncode == 0
    assert name not in os.listdir("/dev/shm")


SCRIPT = """
import os
import dragon.managed_memory as dm
p = dm.MemoryPool(1 << 20, "never destroyed", 99)
p.alloc(1000)
print(os.environ["DRAGON_RUNTIME"].split(":")[1])
"""


def test_nothing_left_after_a_script_under_the_launcher(tmp_path):
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    launcher = os.path.join(os.path.dirname(sys.executable), "dragon")
    r = subprocess.run([launcher, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rt = r.stdout.strip()
    assert len(rt) == 16
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")] == []
