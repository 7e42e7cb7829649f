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
#   RDZV_STORE_GRACE seconds node 0 keeps the rendezvous store after its own torchrun ended,
#                   waiting for the other nodes to finish (default 60)
# Everything after the variables is torchrun's script and its arguments.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NODE_ADDR=${NODE_ADDR:-$(hostname -I | awk '{print $1}')}
IFNAME=${IFNAME:-${NETSIM_IFNAME:-$(ip -o -4 addr show | awk -v a="$NODE_ADDR" '$4 ~ "^"a"/" {print $2; exit}')}}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFNAME}
# Node 0 serves the c10d rendezvous store from a process of its own (rendezvous_store.py) that
# outlives every node's torchrun agent; inside node 0's agent (is_host=1), it vanished when that
# agent exited, and agents still in their exit barrier or rendezvous shutdown logged a trace.
here=$(dirname "$(readlink -f "$0")")
port=${MASTER_PORT:-29500}
store_pid=
if [ "$NODE_RANK" = 0 ]; then
  python "$here/rendezvous_store.py" serve "$MASTER_ADDR" "$port" "$NNODES" &
  store_pid=$!
  trap 'kill "$store_pid" 2>/dev/null || true' EXIT
fi
rc=0
torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$port" \
  --rdzv_id="${RDZV_ID:-commpress}" --rdzv_conf=is_host=0 --local_addr="$NODE_ADDR" \
  "$@" || rc=$?
python "$here/rendezvous_store.py" done "$MASTER_ADDR" "$port" || true
if [ -n "$store_pid" ] && ! timeout "${RDZV_STORE_GRACE:-60}" tail --pid="$store_pid" -f /dev/null; then
  echo "torchrun_multinode.sh: not every node reported done within ${RDZV_STORE_GRACE:-60} s;" \
       "stopping the rendezvous store" >&2
fi
exit "$rc"
