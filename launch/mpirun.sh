#!/usr/bin/env bash
# Launch `commpress train` (or any torch.distributed script) with Open MPI's mpirun as the
# process launcher: MPI only starts the processes; they join a gloo/NCCL group through
# torch.distributed, using Open MPI's rank variables.
#
#   NP=4 HOSTS=node1:2,node2:2 MASTER_ADDR=node1 launch/mpirun.sh qsgd4 natural
#
# NP (processes, default 2), HOSTS (mpirun -H list, default localhost:NP), MASTER_ADDR
# (rank 0's host, default 127.0.0.1), MASTER_PORT (default 29500), IFNAME (interface for
# gloo/NCCL). As root, mpirun needs --allow-run-as-root, which this script passes.
set -euo pipefail
NP=${NP:-2}
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
extra=()
[ -n "${IFNAME:-}" ] && extra+=(-x "GLOO_SOCKET_IFNAME=$IFNAME" -x "NCCL_SOCKET_IFNAME=$IFNAME")
exec mpirun --allow-run-as-root --oversubscribe -np "$NP" -H "${HOSTS:-localhost:$NP}" \
  -x MASTER_ADDR -x MASTER_PORT -x PATH "${extra[@]}" \
  bash -c 'RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK \
           exec python -m commpress.cli train "$@"' _ "$@"
