"""Fuzzing of the parts layout decoder (``dragon._parts.split``): real layouts written by
``header`` are mutated with a seeded generator (bit flips, boundary integers over 4/8-byte
fields, inserted, deleted and truncated ranges); every input gives the parts or a
ValueError, never another exception, and a part is never cut short. Valid layouts
round-trip. Deterministic: ``DRAGON_FUZZ_SEED`` (default fixed) and ``DRAGON_FUZZ_ITERS``
(default 5000; ``make stress`` runs more). ``_parts`` needs only the standard library, so it
is loaded from its file: this runs without the runtime (``python3 test_fuzz_parts.py``)."""

import importlib.util
import os
import pathlib
import random
import time

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "python" / "dragon" / "_parts.py"
_spec = importlib.util.spec_from_file_location("dragon_parts_under_fuzz", _PATH)
parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parts)

SEED = int(os.environ.get("DRAGON_FUZZ_SEED", "0x0d12a90ef0222026"), 0)
ITERS = int(os.environ.get("DRAGON_FUZZ_ITERS", "5000"))


def layout(chunks: list[bytes]) -> bytes:
    """A block in the layout, as Pool.alloc_parts writes it."""
    out = bytearray(parts.header([len(c) for c in chunks]))
    for c in chunks:
        out += c + b"\0" * (-len(c) % 64)
    return bytes(out)


def interesting(rng: random.Random) -> int:
    return rng.choice([0, 1, 7, 63, 64, 65, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(64)])


def mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op in (1, 2) and b:
            w = rng.choice([4, 8])
            i = rng.choice([0, 4, 8, 16, 24]) if rng.random() < 0.7 else rng.randrange(len(b))
            v = (interesting(rng) % 2 ** (8 * w)).to_bytes(w, "little")
            b[i : i + w] = v[: max(0, min(w, len(b) - i))]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and b:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 64)]
        elif b:
            del b[rng.randrange(len(b)) :]
    return bytes(b)


def check(b: bytes) -> bool:
    try:
        views = parts.split(b)
    except ValueError:
        return False
    n = int.from_bytes(b[0:4], "little")
    assert len(views) == n
    lengths = [int.from_bytes(b[8 + 8 * i : 16 + 8 * i], "little") for i in range(n)]
    assert [v.nbytes for v in views] == lengths, "a part was cut short"
    return True


def corpus(rng: random.Random) -> list[bytes]:
    out = [layout([]), layout([b"x"]), layout([b"p" * 64, b"", b"q" * 200])]
    for _ in range(6):
        out.append(layout([rng.randbytes(rng.randrange(130)) for _ in range(rng.randint(1, 9))]))
    return out


def run(iters: int = ITERS, seed: int = SEED) -> tuple[int, int]:
    rng = random.Random(seed)
    base = corpus(rng)
    ok = 0
    t0 = time.monotonic()
    for i in range(iters):
        # Arbitrary parts round-trip.
        chunks = [rng.randbytes(rng.randrange(100)) for _ in range(rng.randrange(5))]
        assert [bytes(v) for v in parts.split(layout(chunks))] == chunks
        b = rng.choice(base)
        b = rng.randbytes(rng.randrange(64)) if rng.random() < 1 / 16 else mutate(rng, b)
        try:
            ok += check(b)
        except Exception:
            print(f"fuzz parts-layout: FAILED at iteration {i} (seed {seed:#x}) on input {b.hex()}")
            raise
    ms = int((time.monotonic() - t0) * 1000)
    print(f"fuzz parts-layout: {iters} iterations, seed {seed:#x}, {ms} ms, {ok} decoded")
    return iters, ok


def test_fuzz_parts_layout():
    n, ok = run()
    assert n == ITERS and 0 < ok < n


@pytest.mark.parametrize(
    "hexed",
    [
        # A count of 2^32 - 1 parts in a 64-byte block (struct.error before, a huge format).
        "ffffffff00000000" + "00" * 56,
        # One part of 100 bytes declared, 10 present (a 10-byte view before: cut short).
        "01000000000000006400000000000000" + "00" * 48 + "61" * 10,
    ],
)
def test_regression_malformed_parts_blocks_raise_value_error(hexed):
    with pytest.raises(ValueError):
        parts.split(bytes.fromhex(hexed))


if __name__ == "__main__":
    run()
