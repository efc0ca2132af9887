# Dragon-RS: one entry point for every check (see README.md).
#   make demo    build and run the main job
#   make test    every test: fmt, clippy, unit + multi-process + crash + CLI tests, loom models
#   make stress  long crash/soak loops and the long fuzz runs (not part of CI); make soak
#   make bench   the benchmark tables (results in bench/results/); bench-py, bench-ddict,
#                bench-channels, ... one table each

CARGO ?= cargo
SHELL := /bin/bash
export CARGO_TERM_COLOR := never

.PHONY: setup demo test lint unit loom py-env py-test faults conformance stress bench bench-transport bench-py bench-ddict bench-channels bench-multinode bench-mpi soak leftovers-before leftovers-after

# System set-up on a fresh Debian 12 machine: a C toolchain, curl, and Rust >= 1.87 (Debian's
# own rustc is too old for our dependencies, so rustup installs it when cargo is missing).
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The optional hwloc topology back end, decided when a recipe runs (after setup installed it).
HWLOC_FEATURE = $$(pkg-config --exists hwloc 2>/dev/null && echo "--features hwloc")
# A wheel linking the system libhwloc is a plain linux wheel for this machine (not manylinux).
WHEEL_FLAGS = $$(pkg-config --exists hwloc 2>/dev/null && echo "--features hwloc --compatibility linux --auditwheel skip")
setup:
	@command -v cc >/dev/null && command -v make >/dev/null && command -v curl >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config curl ca-certificates; }
	@pkg-config --exists hwloc 2>/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends pkg-config libhwloc-dev libudev-dev; } || \
	  echo "make: hwloc not installed: node topology comes from sysfs"
	@pkg-config --exists libfabric 2>/dev/null && command -v ip >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends libfabric-dev libfabric1 iproute2; } || \
	  echo "make: libfabric not installed: the transport's ofi back end is not built"
	@test -x /usr/sbin/slurmctld && test -x /usr/sbin/munged && test -x /usr/sbin/sshd && command -v ssh >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends slurm-wlm munge openssh-server openssh-client; } || \
	  echo "make: slurm-wlm, munge or openssh-server not installed: the Slurm and SSH launch tests skip"
	@command -v mpicc.mpich >/dev/null && command -v mpicc.openmpi >/dev/null && test -e /usr/lib/x86_64-linux-gnu/libpmix.so.2 || \
	  { apt-get update && apt-get install -y --no-install-recommends mpich libmpich-dev openmpi-bin libopenmpi-dev libpmix-dev; } || \
	  echo "make: mpich or openmpi not installed: the PMI tests fail (they need mpicc.mpich and mpicc.openmpi)"
	@# Open MPI takes the plain mpicc/mpiexec names when installed after MPICH: MPICH keeps them
	@test ! -x /usr/bin/mpicc.mpich || update-alternatives --set mpi /usr/bin/mpicc.mpich >/dev/null
	@test ! -x /usr/bin/mpirun.mpich || update-alternatives --set mpirun /usr/bin/mpirun.mpich >/dev/null
	@command -v $(CARGO) >/dev/null || \
	  { curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy; } || \
	  { echo "make: cargo not found and rustup could not be fetched: install Rust >= 1.87"; exit 1; }
	@$(CARGO) --version

demo: setup py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/dragon examples/seed_process_group.py
	$(PYENV)/bin/dragon examples/seed_ddict.py
	$(CARGO) build --release -p dragon-bench -p dragon-tools
	./target/release/shm-bench --quick
	./target/release/dragon-shm ls

test: setup lint leftovers-before unit loom py-test faults conformance leftovers-after

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p dragon-runtime -p dragon-py --all-targets $(HWLOC_FEATURE) -- -D warnings

# With libfabric installed, an ofi back end that cannot run fails the transport tests
# instead of printing SKIP.
OFI_REQUIRED = $$(pkg-config --exists libfabric 2>/dev/null && echo 1 || echo 0)
# The fault-injection test runs in `make faults` (sized there), not twice.
unit:
	DRAGON_REQUIRE_OFI=$(OFI_REQUIRED) $(CARGO) test --workspace --release -- --skip random_kills_and_stops
	$(CARGO) test -p dragon-runtime --release $(HWLOC_FEATURE)

# Loom model checking of the ring's stamp protocol and the futex wait/wake protocol.
loom:
	RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
	  $(CARGO) test -p dragon-shm --test loom --release --target-dir target-loom

# The Python package: a venv under target/ with maturin and the test tools, the wheel built
# from py/ and installed there, then pytest (real processes) on py/tests.
PYENV := target/pyenv
py-env:
	@command -v python3 >/dev/null && python3 -c "import venv, ensurepip" 2>/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev; }
	@test -x $(PYENV)/bin/python || python3 -m venv $(PYENV)
	@$(PYENV)/bin/python -c "import maturin, pytest, numpy, cloudpickle, ruff, mpi4py" 2>/dev/null || \
	  $(PYENV)/bin/pip install -q "maturin>=1.5,<2" pytest numpy cloudpickle ruff mpi4py

py-test: py-env
	$(PYENV)/bin/ruff check py/
	$(PYENV)/bin/ruff format --check py/
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	cd py/tests && ../../$(PYENV)/bin/python -m pytest -q .

# CPython's own multiprocessing tests (process-type classes) under "spawn" and "dragon".
conformance: py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	cd tests/mp_conformance && ../../$(PYENV)/bin/python run_conformance.py --timeout 300 --nodes 3 --out last-run.txt

# Fault injection (issue 18): processes SIGKILLed/SIGSTOPped in the middle of shared-memory
# operations (tests/tests/faults.rs), then whole runtimes: Queue, DDict and Pool workers, a
# node agent and the launcher (py/tests/faults/run_faults.py, needs the wheel installed, as
# py-test leaves it). Each prints its counts; CI runs this small, `make stress` long.
FAULT_KILLS ?= 300
FAULT_PY_KILLS ?= 12
faults: py-env
	DRAGON_FAULT_KILLS=$(FAULT_KILLS) $(CARGO) test --release -p dragon-tests --test faults -- --nocapture
	$(PYENV)/bin/python py/tests/faults/run_faults.py --kills $(FAULT_PY_KILLS)

# The long fuzz form: every target of dragon-fuzz for at least FUZZ_SECS seconds (and its CI
# iteration count); FUZZ_SEED=<n> explores other inputs (CI always runs the default seed).
FUZZ_SECS ?= 60
stress:
	DRAGON_CRASH_ROUNDS=3000 DRAGON_STRESS=1 DRAGON_FAULT_KILLS=1500 $(CARGO) test --release -p dragon-tests -- --nocapture
	$(PYENV)/bin/python py/tests/faults/run_faults.py --kills 60
	DRAGON_FUZZ_SECS=$(FUZZ_SECS) $(if $(FUZZ_SEED),DRAGON_FUZZ_SEED=$(FUZZ_SEED)) \
	  $(CARGO) test --release -p dragon-fuzz -- --nocapture --test-threads=1
	DRAGON_FUZZ_ITERS=1000000 $(if $(FUZZ_SEED),DRAGON_FUZZ_SEED=$(FUZZ_SEED)) python3 py/tests/test_fuzz_parts.py
	@# The packet decoder needs the installed wheel (make py-test installs it).
	@if $(PYENV)/bin/python -c "import dragon._native" 2>/dev/null; then \
	  cd py/tests && DRAGON_FUZZ_ITERS=200000 $(if $(FUZZ_SEED),DRAGON_FUZZ_SEED=$(FUZZ_SEED)) \
	    ../../$(PYENV)/bin/python -m pytest -q -s test_fuzz_packets.py; \
	else echo "stress: packet fuzzing skipped (no wheel in $(PYENV): run make py-test first)"; fi

# Soak (not in CI): 200 processes churning Queues, a DDict and a Pool for 10 minutes; RSS and
# /dev/shm use must stay flat, no error, no segment left: bench/results/soak-latest.txt
soak: py-env
	@mkdir -p bench/results
	@$(PYENV)/bin/dragon bench/py/soak.py --procs 200 --minutes 10 > bench/results/soak-latest.txt 2>&1; rc=$$?; \
	 cat bench/results/soak-latest.txt; \
	 rt=$$(sed -n 's/.*runtime \([0-9a-f]*\)$$/\1/p' bench/results/soak-latest.txt); \
	 left=$$(ls /dev/shm | grep "^dragon-$$rt-"); \
	 if [ -z "$$rt" ] || [ -n "$$left" ]; then echo "soak left segments: $$left" | tee -a bench/results/soak-latest.txt; exit 1; fi; \
	 echo "no segment of runtime $$rt left" | tee -a bench/results/soak-latest.txt; exit $$rc

# The Python runtime benchmark against stdlib multiprocessing (and DragonHPC with
# DRAGONHPC=/path/to/venv): bench/results/runtime-bench-latest.txt
bench-py: py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	mkdir -p bench/results
	$(PYENV)/bin/python bench/py/runtime_bench.py $(if $(DRAGONHPC),--dragonhpc $(DRAGONHPC)) | tee bench/results/runtime-bench-latest.txt

# The DDict benchmark (dragon-rs vs Manager().dict(), DragonHPC with DRAGONHPC=..., Ray when
# importable): bench/results/ddict-bench-latest.txt
bench-ddict: py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	mkdir -p bench/results
	$(PYENV)/bin/python bench/py/ddict_bench.py $(if $(DRAGONHPC),--dragonhpc $(DRAGONHPC)) | tee bench/results/ddict-bench-latest.txt

# dragon.channels (DragonHPC's lower-level API): small-message round trip and 64 MiB messages
# between two processes, against DragonHPC's own dragon.channels with DRAGONHPC=/path/to/venv
# (default /work/dragonhpc-venv when it exists) and memcpy: bench/results/channels-bench-latest.txt
DRAGONHPC_CH ?= $(or $(DRAGONHPC),$(wildcard /work/dragonhpc-venv))
bench-channels: py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	mkdir -p bench/results
	$(PYENV)/bin/python bench/py/channels_bench.py $(if $(DRAGONHPC_CH),--dragonhpc $(DRAGONHPC_CH)) | tee bench/results/channels-bench-latest.txt

# Multi-node (3 local nodes over tcp and ofi) against raw loopback TCP and stdlib spawn:
# bench/results/multinode-bench-latest.txt
# MPI groups: a 4-rank MPICH hello through ProcessGroup(pmi=...) against mpiexec -n 4.
bench-mpi: setup py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	mkdir -p bench/results
	$(PYENV)/bin/python bench/py/mpi_bench.py | tee bench/results/mpi-bench-latest.txt

bench-multinode: py-env
	rm -f target/wheels/dragon_rs-*.whl
	$(PYENV)/bin/maturin build --release -m py/Cargo.toml -o target/wheels $(WHEEL_FLAGS)
	$(PYENV)/bin/pip install -q --force-reinstall --no-deps target/wheels/dragon_rs-*.whl
	mkdir -p bench/results
	$(PYENV)/bin/python bench/py/multinode_bench.py | tee bench/results/multinode-bench-latest.txt

bench:
	$(CARGO) build --release -p dragon-bench
	mkdir -p bench/results
	./target/release/shm-bench --rounds 5 | tee bench/results/shm-bench-latest.txt

# Transport back ends (tcp, ofi over tcp;ofi_rxm and shm) against raw loopback TCP.
bench-transport: setup
	$(CARGO) build --release -p dragon-bench
	mkdir -p bench/results
	./target/release/transport-bench | tee bench/results/transport-bench-latest.txt

# Tests must leave nothing in /dev/shm: compare the names before and after. Ours (dragon-) and
# libfabric shm provider's (PID:..., made by the transport tests) fail the run. CPython's
# (sem.mp- semaphores, psm_ SharedMemory) are reported: the stdlib's own conformance suite can
# leave them (run_conformance.py names the class, removes them and says why).
SHM_OURS = '^(dragon-|[0-9]+:)'
SHM_CPYTHON = '^(sem\.mp-|psm_)'
leftovers-before:
	@ls /dev/shm | grep -E $(SHM_OURS) | sort > /tmp/dragon-rs-shm-before.txt || true
	@ls /dev/shm | grep -E $(SHM_CPYTHON) | sort > /tmp/dragon-rs-shm-cpython-before.txt || true
leftovers-after:
	@ls /dev/shm | grep -E $(SHM_CPYTHON) | sort > /tmp/dragon-rs-shm-cpython-after.txt || true
	@new=$$(comm -13 /tmp/dragon-rs-shm-cpython-before.txt /tmp/dragon-rs-shm-cpython-after.txt); \
	 if [ -n "$$new" ]; then echo "warning: CPython names left in /dev/shm:"; echo "$$new"; fi
	@ls /dev/shm | grep -E $(SHM_OURS) | sort > /tmp/dragon-rs-shm-after.txt || true
	@# a segment whose maker still runs belongs to another run sharing this machine
	@new=$$(comm -13 /tmp/dragon-rs-shm-before.txt /tmp/dragon-rs-shm-after.txt | \
	   $(PYENV)/bin/python -c 'import sys; from dragon import _native; [print(n) for n in sys.stdin.read().split() if not n.startswith("dragon-") or not _native.segment_creator(n)[1]]' 2>/dev/null || \
	   comm -13 /tmp/dragon-rs-shm-before.txt /tmp/dragon-rs-shm-after.txt); \
	 if [ -n "$$new" ]; then echo "tests left segments in /dev/shm:"; echo "$$new"; exit 1; fi; \
	 echo "no segments left behind in /dev/shm"
