#!/usr/bin/env bash
# A single-node SLURM cluster for the tests, everything under one folder: munged, MariaDB, slurmdbd,
# slurmctld and slurmd (Debian's munge, mariadb-server, slurmdbd and slurm-wlm), run as root without
# systemd or cgroups, with one partition `ptqtest` (not the default: a job that names no partition
# is refused), one node holding a stand-in A100 (gres `gpu:a100:1`: a character device, no GPU
# behind it), and accounting as a real cluster keeps it: slurmdbd stores every job in MariaDB, so
# `sacct` answers (the executor plugin's status checks use it), and associations are enforced: a
# job must name an account its user belongs to (root belongs to `ptqlab` besides `root`).
#
#   tests/slurm/start_cluster.sh DIR     brings it up, waits until the node is idle, writes
#                                        DIR/pids (the daemons, for stop_cluster.sh) and DIR/bin/
#                                        (sbatch, srun, squeue, ... set to this cluster's config)
#   tests/slurm/stop_cluster.sh DIR      stops the daemons by their PIDs
#
# The wrappers in DIR/bin matter: the executor plugin's job step drops every SLURM_* variable,
# SLURM_CONF included, before its inner srun; a wrapper on PATH sets it again. If bring-up fails,
# the daemons started so far are stopped before the script exits.
set -euo pipefail

dir=$(realpath -m "${1:?usage: start_cluster.sh DIR}")
export PATH=$PATH:/usr/sbin:/sbin
here=$(dirname "$(realpath "$0")")
mkdir -p "$dir"/{bin,etc,log,munge,spool,state,gpu,mysql}
: > "$dir/pids"
trap '[ $? -eq 0 ] || "$here/stop_cluster.sh" "$dir"' EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
read -r cpus memory < <(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\) .*RealMemory=\([0-9]*\).*/\1 \2/p')
mknod "$dir/gpu/0" c 1 3    # /dev/null's numbers: a GPU's file must be a character device

db_port=$(free_port)
dbd_port=$(free_port)

cat > "$dir/etc/slurm.conf" <<EOF
ClusterName=ptqtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/state/slurmctld.pid
SlurmdPidFile=$dir/spool/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$dir/munge/munge.socket.2
AccountingStorageEnforce=associations
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MailProg=/bin/true
MpiDefault=none
MinJobAge=600
ReturnToService=2
GresTypes=gpu
NodeName=ptqnode NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:a100:1 State=UNKNOWN
PartitionName=ptqtest Nodes=ptqnode Default=NO MaxTime=INFINITE State=UP
EOF
cat > "$dir/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=ptqnode Name=gpu Type=a100 File=$dir/gpu/0
EOF

for command in sbatch srun squeue scontrol sinfo scancel sacct sacctmgr sshare; do
    real=$(command -v "$command")
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$dir/etc/slurm.conf" "$real" > "$dir/bin/$command"
    chmod +x "$dir/bin/$command"
done

chmod 755 "$dir/munge"
mungekey --create --keyfile="$dir/munge/munge.key" --force > /dev/null
munged --force --foreground --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    > "$dir/log/munged.out" 2>&1 &
echo $! >> "$dir/pids"
for _ in $(seq 50); do [ -S "$dir/munge/munge.socket.2" ] && break; sleep 0.1; done

# MariaDB on a free port of 127.0.0.1, its data in DIR/mysql; slurmdbd's database and user
mariadb-install-db --no-defaults --user=root --datadir="$dir/mysql" --skip-test-db > "$dir/log/mariadb-install.out" 2>&1
mariadbd --no-defaults --user=root --datadir="$dir/mysql" --socket="$dir/mysql.sock" --port="$db_port" \
    --bind-address=127.0.0.1 --pid-file="$dir/state/mariadbd.pid" --log-error="$dir/log/mariadbd.log" \
    > "$dir/log/mariadbd.out" 2>&1 &
echo $! >> "$dir/pids"
for _ in $(seq 150); do mariadb --no-defaults --socket="$dir/mysql.sock" -u root -e 'select 1' > /dev/null 2>&1 && break; sleep 0.2; done
mariadb --no-defaults --socket="$dir/mysql.sock" -u root -e "CREATE DATABASE slurm_acct_db;
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'ptqtest'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat > "$dir/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=ptqtest
StorageLoc=slurm_acct_db
EOF
chmod 600 "$dir/etc/slurmdbd.conf"    # slurmdbd refuses a config others can read

export SLURM_CONF=$dir/etc/slurm.conf  # slurmdbd reads slurmdbd.conf from the same folder
slurmdbd -D > "$dir/log/slurmdbd.out" 2>&1 &
echo $! >> "$dir/pids"
for _ in $(seq 150); do sacctmgr --noheader list cluster > /dev/null 2>&1 && break; sleep 0.2; done
sacctmgr --immediate add cluster ptqtest > /dev/null
sacctmgr --immediate add account ptqlab cluster=ptqtest description=ptqrepro-tests > /dev/null
sacctmgr --immediate add user root account=ptqlab cluster=ptqtest > /dev/null
slurmctld -D -i > "$dir/log/slurmctld.out" 2>&1 &
echo $! >> "$dir/pids"
slurmd -D -N ptqnode > "$dir/log/slurmd.out" 2>&1 &
echo $! >> "$dir/pids"

for _ in $(seq 150); do
    if [ "$("$dir/bin/sinfo" --noheader --nodes=ptqnode --format=%t 2>/dev/null)" = idle ]; then
        exit 0
    fi
    sleep 0.2
done
echo "start_cluster.sh: node ptqnode not idle after 30 s; logs in $dir/log" >&2
exit 1
