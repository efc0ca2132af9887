"""Ends the processes of the test cluster in DIR (used by down.sh): the daemons named by
DIR/pids (slurmd, slurmctld, then munged), then any process tied to DIR by its environment
(DRAGON_SLURM_TEST=DIR: a daemon's slurmstepd; SLURM_CONF=DIR/slurm.conf with
SLURMD_NODENAME: a job's task), never this process or its ancestors. SIGTERM, a bounded
wait, SIGKILL. Exits 1 if something survived."""

import glob
import os
import signal
import sys
import time


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None, None


def alive(pid):
    state, _ = stat(pid)
    return state not in (None, "Z")


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return set(f.read().split(b"\0"))
    except OSError:
        return set()


def ancestors():
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        pid = stat(pid)[1] or 0
    return out


def tied(d):
    conf = f"SLURM_CONF={d}/slurm.conf".encode()
    mark = f"DRAGON_SLURM_TEST={d}".encode()
    mine = ancestors()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in mine:
            continue
        env = environ(p)
        if mark in env or (conf in env and any(v.startswith(b"SLURMD_NODENAME=") for v in env)):
            out.append(int(p))
    return out


def stop(pids, patience):
    pids = [p for p in pids if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + patience
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        pids = [p for p in pids if alive(p)]
        if not pids:
            return []
    return pids


def from_file(path):
    try:
        with open(path) as f:
            return [int(f.read().strip())]
    except (OSError, ValueError):
        return []


def main(d):
    daemons = [p for f in sorted(glob.glob(f"{d}/pids/slurmd-*.pid")) for p in from_file(f)]
    left = stop(daemons + from_file(f"{d}/pids/slurmctld.pid"), 10)
    left += stop(from_file(f"{d}/pids/munged.pid"), 5)
    left += stop(tied(d), 5)
    if left:
        print(f"slurm down: still alive: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(os.path.abspath(sys.argv[1])))
