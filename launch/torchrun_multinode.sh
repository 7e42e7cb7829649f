#!/usr/bin/env bash
# Start one node of a multi-node torchrun job; run it on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NODE_ADDR=10.0.0.1 IFNAME=eth0 \
#     launch/torchrun_multinode.sh -m commpress.cli train qsgd4
#
# Variables (inside `commpress netsim run` all but NPROC_PER_NODE are already set):
#   NNODES          number of nodes
#   NODE_RANK       this node's index; node 0 hosts the rendezvous store
#   MASTER_ADDR     node 0's address, reachable from every node
#   NODE_ADDR       this node's address on the same network (default: first of hostname -I)
#   IFNAME          interface gloo/NCCL must use (default: NETSIM_IFNAME, else the one
#                   holding NODE_ADDR); without it ranks may advertise 127.0.0.1 and hang
#   NPROC_PER_NODE  processes per node (default 1; one per GPU with NCCL)
#   MASTER_PORT     rendezvous port (default 29500)     RDZV_ID  job id (default commpress)
#   RDZV_BACKEND    static (default: the node ranks are known, node 0's agent hosts the
#                   store) or c10d (elastic membership; when node 0's agent exits first, the
#                   others log a "failed to shutdown the rendezvous" trace at the very end)
# Everything after the variables is torchrun's script and its arguments.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NODE_ADDR=${NODE_ADDR:-$(hostname -I | awk '{print $1}')}
IFNAME=${IFNAME:-${NETSIM_IFNAME:-$(ip -o -4 addr show | awk -v a="$NODE_ADDR" '$4 ~ "^"a"/" {print $2; exit}')}}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFNAME}
case "${RDZV_BACKEND:=static}" in
  static) rdzv=(--node_rank="$NODE_RANK") ;;
  c10d) is_host=0; [ "$NODE_RANK" = 0 ] && is_host=1; rdzv=(--rdzv_conf="is_host=$is_host") ;;
  *) echo "torchrun_multinode.sh: RDZV_BACKEND must be static or c10d, not $RDZV_BACKEND" >&2; exit 2 ;;
esac
exec torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --rdzv_backend="$RDZV_BACKEND" --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-commpress}" "${rdzv[@]}" --local_addr="$NODE_ADDR" \
  "$@"
