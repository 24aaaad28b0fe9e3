#!/usr/bin/env bash
# A real SLURM on this host, for tests and demos: one slurmctld + 1..2 simulated nodes (one slurmd
# each), munge auth, no systemd, all state under one temporary directory.
#
#   slurm/local_cluster.sh start    # install Debian packages if missing (root), start, wait until idle
#   slurm/local_cluster.sh status   # daemons and `sinfo`
#   slurm/local_cluster.sh stop     # stops only the daemons this script started (pid files)
#   slurm/local_cluster.sh env      # prints the exports a shell needs (SLURM_CONF, PATH with sacct shim)
#
# Variables: MEGAVLA_SLURM_DIR (state dir, default /tmp/megavla-slurm), MEGAVLA_SLURM_NODES (1 or 2,
# default 2), MEGAVLA_SLURM_CPUS (CPUs per simulated node, default 2), MEGAVLA_SLURMCTLD_PORT (16817).
# Facts behind the settings: ../shared/notes/platform-facts.md (cred_expire=10 + sched_interval=2 make a
# requeue take ~12 s instead of ~2 min; simulated nodes don't resolve, so jobs use MASTER_ADDR=127.0.0.1).
set -euo pipefail

STATE_DIR="${MEGAVLA_SLURM_DIR:-/tmp/megavla-slurm}"
NODES="${MEGAVLA_SLURM_NODES:-2}"
CPUS="${MEGAVLA_SLURM_CPUS:-2}"
CTLD_PORT="${MEGAVLA_SLURMCTLD_PORT:-16817}"
SHIM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/bin"
CONF="$STATE_DIR/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE -> 0 when the pid in it is a running process
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_names() {
  if [[ "$NODES" == 1 ]]; then echo localhost; else for i in $(seq 1 "$NODES"); do echo "node$i"; done; fi
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  [[ $(id -u) == 0 ]] || die "slurm is not installed and installing needs root: apt-get install slurmctld slurmd slurm-client munge"
  command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get (Debian/Ubuntu only)"
  log "installing slurmctld slurmd slurm-client munge (apt-get, ~10 s)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$STATE_DIR/state" "$STATE_DIR/log" "$STATE_DIR/run"
  local node_line
  if [[ "$NODES" == 1 ]]; then
    node_line="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN"
  else
    node_line="NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=4000 State=UNKNOWN"
  fi
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh; regenerated on every start.
ClusterName=megavla
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
$node_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then
    return  # somebody's munged (ours from an earlier start, or the system's): reuse, never stop it
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$STATE_DIR/run/munged.started-by-us"
}

cmd_start() {
  install_if_missing
  if alive "$STATE_DIR/run/slurmctld.pid"; then
    log "already running (state in $STATE_DIR)"
  else
    mkdir -p "$STATE_DIR/run"
    write_conf
    # /etc/slurm/slurm.conf makes plain `sbatch` work in any shell; only when nobody else's is there.
    if [[ ! -e /etc/slurm/slurm.conf && -w /etc/slurm ]]; then
      ln -s "$CONF" /etc/slurm/slurm.conf && touch "$STATE_DIR/run/etc-link.created-by-us"
    fi
    start_munge
    # -c: a fresh start begins with an empty job table. Jobs recorded by an earlier run whose
    # processes are gone (machine restarted, daemons killed) would otherwise hold the nodes
    # allocated and new jobs would pend forever. Job ids restart at 1.
    slurmctld -c -i -f "$CONF"
    for n in $(node_names); do
      mkdir -p "$STATE_DIR/spool/$n"
      if [[ "$NODES" == 1 ]]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$n"; fi
    done
  fi
  # Wait until every node is idle (~1-3 s); a node left DOWN by an earlier run is resumed.
  for _ in $(seq 1 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qvE '^(idle|mix|alloc)$'; then
      for n in $(node_names); do scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; done
    elif [[ -n "$(sinfo -h -o '%t' 2>/dev/null)" ]]; then
      log "up: $(sinfo -h -o '%D nodes %t' | tr '\n' ' ')(SLURM_CONF=$CONF)"
      return 0
    fi
    sleep 0.5
  done
  die "nodes did not become idle in 30 s; see $STATE_DIR/log/"
}

stop_pidfile() {
  local f="$1"
  alive "$f" || { rm -f "$f"; return 0; }
  local pid; pid="$(cat "$f")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  rm -f "$f"
}

cmd_stop() {
  local f
  for f in "$STATE_DIR"/run/slurmd-*.pid; do [[ -e "$f" ]] && stop_pidfile "$f"; done
  stop_pidfile "$STATE_DIR/run/slurmctld.pid"
  if [[ -e "$STATE_DIR/run/munged.started-by-us" ]]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$STATE_DIR/run/munged.started-by-us"
  fi
  if [[ -e "$STATE_DIR/run/etc-link.created-by-us" ]]; then
    [[ -L /etc/slurm/slurm.conf ]] && rm -f /etc/slurm/slurm.conf
    rm -f "$STATE_DIR/run/etc-link.created-by-us"
  fi
  log "stopped"
}

cmd_status() {
  local f rc=0
  for f in "$STATE_DIR/run/slurmctld.pid" "$STATE_DIR"/run/slurmd-*.pid; do
    [[ -e "$f" ]] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
    else echo "$(basename "$f" .pid): not running"; rc=1; fi
  done
  [[ -e "$STATE_DIR/run/slurmctld.pid" ]] || { echo "not started (state dir $STATE_DIR)"; return 1; }
  sinfo || rc=1
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF PATH=$SHIM_DIR:\$PATH" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
