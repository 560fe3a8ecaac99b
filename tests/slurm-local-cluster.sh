#!/bin/bash
# Single-host SLURM cluster for CI (Debian 12 / slurm-wlm 22.05.8, run as root, no systemd).
#   slurm-local-cluster.sh install        apt-get install slurmctld slurmd slurm-client munge
#   slurm-local-cluster.sh up [NNODES]    write config, start munged + slurmctld + NNODES slurmd (default 1)
#   slurm-local-cluster.sh down           scontrol shutdown, stop munged
# Then: export SLURM_CONF=$BASE/etc/slurm.conf   (or set BASE/CONF_DIR=/etc/slurm to avoid it)
set -euo pipefail
BASE=${BASE:-${TMPDIR:-/tmp}/slurm-local}
CONF_DIR=${CONF_DIR:-$BASE/etc}
export SLURM_CONF=$CONF_DIR/slurm.conf
HOST=$(hostname -s)
NCPU=${NCPU:-4}          # virtual CPUs per node (may exceed real cores: config_overrides)
MEM=${MEM:-8000}         # MB per node
NGPU=${NGPU:-0}          # fake GPUs per node (symlinks to /dev/null), 0 = none

install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; }
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  if ! munge -n >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; fi
  munge -n | unmunge >/dev/null
}

write_conf() {
  local n=$1 nodes gres=""
  mkdir -p "$CONF_DIR" "$BASE"/{state,spool,log,run,dev}
  rm -rf "$BASE"/state/*            # fresh controller state every bring-up
  [ "$NGPU" -gt 0 ] && gres="Gres=gpu:$NGPU"
  cat > "$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=5
KillWait=5
Waittime=0
$( [ "$NGPU" -gt 0 ] && echo GresTypes=gpu )
EOF
  : > "$CONF_DIR/gres.conf"
  if [ "$NGPU" -gt 0 ]; then
    for i in $(seq 0 $((NGPU-1))); do ln -sfn /dev/null "$BASE/dev/nvidia$i"; done
    echo "Name=gpu File=$BASE/dev/nvidia[0-$((NGPU-1))]" > "$CONF_DIR/gres.conf"
  fi
  if [ "$n" -eq 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM $gres State=UNKNOWN" >> "$SLURM_CONF"
    nodes=$HOST
  else
    for i in $(seq 1 "$n"); do
      echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000+i)) CPUs=$NCPU CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM $gres State=UNKNOWN" >> "$SLURM_CONF"
      # node names must resolve for rendezvous (MASTER_ADDR=first node of SLURM_JOB_NODELIST)
      getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i" >> /etc/hosts
    done
    nodes="n[1-$n]"
  fi
  echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP" >> "$SLURM_CONF"
}

up() {
  local n=${1:-1}
  start_munge
  write_conf "$n"
  slurmctld -f "$SLURM_CONF"
  if [ "$n" -eq 1 ]; then slurmd -f "$SLURM_CONF"
  else for i in $(seq 1 "$n"); do slurmd -f "$SLURM_CONF" -N "n$i"; done; fi
  for _ in $(seq 1 60); do   # wait until all nodes idle
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" -eq "$n" ] && { sinfo -N; return 0; }
    sleep 0.5
  done
  echo "nodes did not become idle" >&2; sinfo -N -l >&2; tail -n 20 "$BASE"/log/*.log >&2; return 1
}

down() {
  scontrol shutdown >/dev/null 2>&1 || true     # stops slurmctld and every registered slurmd
  for _ in $(seq 1 20); do
    ls "$BASE"/run/*.pid >/dev/null 2>&1 || break
    local alive=0; for p in "$BASE"/run/*.pid; do kill -0 "$(cat "$p")" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break; sleep 0.5
  done
  for p in "$BASE"/run/*.pid; do [ -f "$p" ] && { kill "$(cat "$p")" 2>/dev/null || true; rm -f "$p"; }; done
  munged --stop 2>/dev/null || true
  return 0
}

cmd=${1:-}; shift || true
case "$cmd" in
  install) install ;;
  up) up "$@" ;;
  down) down ;;
  *) echo "usage: $0 install|up [NNODES]|down" >&2; exit 2 ;;
esac
