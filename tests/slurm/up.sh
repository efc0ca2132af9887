#!/usr/bin/env bash
# tests/slurm/up.sh DIR [NODES] — a private Slurm cluster of NODES (default 3) emulated nodes
# n1..nN on this host, for the multi-node launcher tests (py/tests/test_wlm.py).
#
# Everything lives under DIR (created, must be empty): a munged of its own (own key and
# socket), slurmctld and one `slurmd -N nK` per node, all on 127.0.0.1 with ports picked free
# now. Each daemon's pid is in DIR/pids/<name>.pid and each carries DRAGON_SLURM_TEST=DIR in
# its environment (so down.sh can find its job steps too). Prints `SLURM_CONF=DIR/slurm.conf`
# on stdout once every node is idle (bounded by DRAGON_SLURM_UP_WAIT seconds, default 30);
# on failure prints the daemons' logs, stops what it started and exits 1.
#
# Needs root and Debian's slurm-wlm and munge (`make setup` installs them). The emulated
# nodes share this host's name, address and /dev/shm: tell them apart by SLURMD_NODENAME.
# Stop it with tests/slurm/down.sh DIR.
set -u
say() { echo "slurm up: $*" >&2; }
[ $# -ge 1 ] && [ $# -le 2 ] || { say "usage: up.sh DIR [NODES]"; exit 2; }
[ "$(id -u)" -eq 0 ] || { say "needs root (munged runs as user munge, the slurm daemons as root)"; exit 2; }
for tool in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd sinfo python3; do
  command -v "$tool" >/dev/null || { say "$tool missing (apt-get install slurm-wlm munge)"; exit 2; }
done
getent passwd munge >/dev/null || { say "no user munge (apt-get install munge)"; exit 2; }

mkdir -p "$1" && DIR=$(cd "$1" && pwd) || { say "cannot make $1"; exit 2; }
[ -z "$(ls -A "$DIR")" ] || { say "$DIR is not empty"; exit 2; }
N=${2:-3}
WAIT=${DRAGON_SLURM_UP_WAIT:-30}
HOST=$(hostname -s)
touch "$DIR/.dragon-slurm-test"   # down.sh removes only directories that carry this mark
mkdir -p "$DIR/auth" "$DIR/pids" "$DIR/logs" "$DIR/ctld"
chmod 755 "$DIR"                  # munged (user munge) walks through it
runuser -u munge -- test -x "$DIR" || { say "user munge cannot reach $DIR (a parent directory is private)"; exit 2; }

# Free TCP ports: the kernel picks them (bound together, then released).
read -r -a PORTS <<<"$(python3 - "$((N + 2))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)"
[ "${#PORTS[@]}" -eq $((N + 2)) ] || { say "could not pick $((N + 2)) free ports"; exit 1; }
NODE_PORTS=$(IFS=,; echo "${PORTS[*]:2}")

# munge: a private key and socket; the key readable by munge alone, the socket by all.
dd if=/dev/urandom of="$DIR/auth/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$DIR/auth"
chmod 400 "$DIR/auth/munge.key"
chmod 755 "$DIR/auth"
SOCKET="$DIR/auth/munge.sock"

# The node's hardware as slurmd reports it (more CPUs than that would drain the nodes).
HW=$(/usr/sbin/slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //; s/ RealMemory=[0-9]*//; s/ UpTime=.*//')
cat >"$DIR/slurm.conf" <<EOF
# Emulated test cluster (tests/slurm/up.sh): nodes n1..n$N are slurmd processes on $HOST.
ClusterName=dragontest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${PORTS[0]}
SlurmdPort=${PORTS[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=10
MailProg=/bin/true
NodeName=n[1-$N] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORTS $HW State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

failed() {
  say "$*"
  for log in "$DIR"/logs/* "$DIR"/auth/munged.log; do
    [ -s "$log" ] && { echo "== $log" >&2; tail -n 20 "$log" >&2; }
  done
  "$(dirname "$0")/down.sh" --keep "$DIR" >&2
  exit 1
}

export SLURM_CONF="$DIR/slurm.conf" DRAGON_SLURM_TEST="$DIR"
runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --key-file="$DIR/auth/munge.key" \
  --pid-file="$DIR/auth/munged.pid" --log-file="$DIR/auth/munged.log" \
  --seed-file="$DIR/auth/munged.seed" 2>"$DIR/logs/munged.err" || failed "munged did not start"
# munged forks: its pid file and socket appear when it serves.
for _ in $(seq 100); do [ -S "$SOCKET" ] && [ -s "$DIR/auth/munged.pid" ] && break; sleep 0.05; done
[ -S "$SOCKET" ] || failed "no munge socket"
cp "$DIR/auth/munged.pid" "$DIR/pids/munged.pid"

/usr/sbin/slurmctld -f "$SLURM_CONF" -i 2>"$DIR/logs/slurmctld.err" || failed "slurmctld did not start"
for k in $(seq "$N"); do
  mkdir -p "$DIR/spool-n$k"
  /usr/sbin/slurmd -f "$SLURM_CONF" -N "n$k" 2>"$DIR/logs/slurmd-n$k.err" || failed "slurmd n$k did not start"
done

# Ready when sinfo shows every node plainly idle (not idle*, down or drained).
end=$((SECONDS + WAIT))
until [ "$(timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)" -ge "$N" ]; do
  [ $SECONDS -lt $end ] || failed "not all $N nodes idle after ${WAIT}s: $(timeout 5 sinfo -h -N -o '%N:%T' | tr '\n' ' ')"
  sleep 0.1
done
echo "SLURM_CONF=$SLURM_CONF"
