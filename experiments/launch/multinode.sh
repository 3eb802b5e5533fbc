#!/usr/bin/env bash
# moelab across nodes: one process per GPU, started by the launcher you have; moelab reads its
# rank and world from the launcher's variables (srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;
# Open MPI's mpirun: OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; PMI_RANK/PMI_SIZE) and the rank
# within its node picks its GPU. Rank 0 shares the NCCL id through a file every node sees.
#
#   experiments/launch/multinode.sh srun   NODES GPUS_PER_NODE CONFIG.ini EP DP [train options...]
#   experiments/launch/multinode.sh mpirun NODES GPUS_PER_NODE CONFIG.ini EP DP [train options...]
#   DRY_RUN=1 ...   prints the launch command and checks the config, runs nothing
#
# EP x DP must equal NODES x GPUS_PER_NODE. The id file is runs/nccl_id.<job id> (set
# NCCL_ID_FILE to put it elsewhere); it must be on a shared file system. mpirun needs a
# hostfile or an allocation (MPI_HOSTS, passed as --host).
set -euo pipefail
[ $# -ge 6 ] || { sed -n '2,14p' "$0"; exit 2; }
launcher=$1 nodes=$2 per_node=$3 config=$4 ep=$5 dp=$6; shift 6
moelab=${MOELAB:-$(readlink -f "$(dirname "$0")/../../build/moelab")}
world=$((nodes * per_node))
[ $((ep * dp)) -eq "$world" ] || { echo "multinode.sh: ep x dp = $((ep * dp)) but $nodes x $per_node = $world ranks" >&2; exit 2; }
id_file=${NCCL_ID_FILE:-runs/nccl_id.$(date +%Y%m%d%H%M%S).$$}
train=("$moelab" train --config "$config" --backend cuda --set "parallel.ep=$ep" --set "parallel.dp=$dp"
       --nccl-id "$id_file" "$@")
case $launcher in
  srun)   cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node" --gpus-per-node="$per_node"
               --export=ALL,NCCL_NVLS_ENABLE=0 "${train[@]}") ;;
  mpirun) cmd=(mpirun -np "$world" --map-by "ppr:$per_node:node" ${MPI_HOSTS:+--host "$MPI_HOSTS"}
               -x NCCL_NVLS_ENABLE=0 -x PATH -x LD_LIBRARY_PATH "${train[@]}") ;;
  *) echo "multinode.sh: launcher '$launcher' is not one of srun|mpirun" >&2; exit 2 ;;
esac
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "would run ($world ranks = $nodes nodes x $per_node GPUs): ${cmd[*]}"
  "$moelab" config --config "$config" --set "parallel.ep=$ep" --set "parallel.dp=$dp" >/dev/null
  echo "config ok: parallel.ep=$ep parallel.dp=$dp"
  exit 0
fi
mkdir -p "$(dirname "$id_file")"
exec "${cmd[@]}"
