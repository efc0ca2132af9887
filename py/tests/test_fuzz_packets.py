"""Fuzzing of the "dragon" connections' packet decoder (``dragon._conn.decode`` and
``decode_bytes``): real packets (inline pickles of many object kinds, NumPy arrays by value,
spill and block headers naming nothing that exists) are mutated with a seeded generator; a
packet gives its object or raises an ``Exception``, never crashes the process, and a spill
packet never opens or unlinks anything but one of our raw segments. Deterministic:
``DRAGON_FUZZ_SEED``, ``DRAGON_FUZZ_ITERS`` (default 3000).

The pickle inside a packet is CPython's to decode and trusted by design (unpickling runs the
sender's code), so the fuzzed decoder hands it to a stand-in for ``_loads`` that only takes
its bytes and buffers: CPython's unpickler on mutated pickles is not ours to fuzz, and it can
take the machine's memory (a 200 000-input run was killed: a ``LONG_BINPUT`` with a large
memo index makes it allocate and zero a memo table of that many entries)."""

import os
import random
import struct
import time

import numpy as np
import pytest
from dragon import _conn
from dragon.exceptions import DragonOSError

SEED = int(os.environ.get("DRAGON_FUZZ_SEED", "0x0d12a90ef0222026"), 0)
ITERS = int(os.environ.get("DRAGON_FUZZ_ITERS", "3000"))
LIMIT = 4096


def corpus() -> list[bytes]:
    objs = [
        0,
        -(2**70),
        3.5,
        "text é",
        b"\x00\xff" * 20,
        None,
        True,
        (1, "a", b"b"),
        [1, [2, [3]]],
        {"k": 1, 2: (3,)},
        {1, 2, 3},
        bytearray(b"ba"),
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.asfortranarray(np.ones((2, 3))),
        np.array([1.5, 2.5], dtype=">f8"),
    ]
    out = [_conn.encode_obj(o, LIMIT) for o in objs]
    assert all(p[0] in (_conn._INLINE, _conn._NDARRAY) for p in out)
    # Headers of a spill segment and of a pool block that do not exist.
    out.append(bytes([_conn._SPILL]) + b"/dragon-00000000deadbeef-0-raw-12345")
    out.append(bytes([_conn._BLOCK]) + _conn._REF.pack(1, 4096, 64, 1) + b"/dragon-00000000deadbeef-0-pool-1")
    return out


def mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice([0, 1, 2, 3, 0x7F, 0x80, 0xFF])
        elif op == 2 and b:
            w = rng.choice([1, 2, 4, 8])
            i = rng.randrange(len(b))
            v = rng.choice([0, 1, 255, 2**31, 2**63 - 1, rng.getrandbits(64)]) % 2 ** (8 * w)
            b[i : i + w] = v.to_bytes(w, "little")[: len(b) - i]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and b:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        elif len(b) > 1:
            del b[rng.randrange(1, len(b)) :]
    return bytes(b)


def test_fuzz_packet_decoder(monkeypatch):
    rng = random.Random(SEED)
    base = corpus()
    # Valid packets decode.
    for p in base[:-2]:
        _conn.decode(p)
    monkeypatch.setattr(_conn, "_loads", lambda data, buffers=(): (bytes(data), list(buffers)))
    decoded = 0
    t0 = time.monotonic()
    for i in range(ITERS):
        p = mutate(rng, rng.choice(base))
        if not p:
            continue
        try:
            try:
                _conn.decode(p)
                decoded += 1
            except Exception:
                pass
            try:
                _conn.decode_bytes(p)
            except Exception:
                pass
        except BaseException:
            print(f"fuzz packets: FAILED at iteration {i} (seed {SEED:#x}) on input {p.hex()}")
            raise
    ms = int((time.monotonic() - t0) * 1000)
    print(f"fuzz packets: {ITERS} iterations, seed {SEED:#x}, {ms} ms, {decoded} decoded")
    assert decoded > 0


@pytest.mark.parametrize("escape", ["../../{}", "/../..{}", "dragon-x/../../..{}"])
def test_regression_a_spill_packet_names_only_our_raw_segments(tmp_path, escape):
    # A spill packet's name went into "/dev/shm/" + name unchecked: a corrupt one opened, and
    # unlinked, any file its path reached ("../" included).
    victim = tmp_path / "victim"
    victim.write_bytes(struct.pack("<II", 0, 0))
    p = bytes([_conn._SPILL]) + escape.format(victim).encode()
    with pytest.raises(DragonOSError):
        _conn.decode(p)
    assert victim.exists()
