#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of under 8 minutes, every result under one folder:
#
#   bash tests/gpu/run_all.sh [OUT]        # OUT defaults to build/gpu-results
#
# 1. env.txt: the device, torch, CUDA and NCCL versions (nvidia-smi where present)
# 2. tests_gpu.log / .xml: the tests/gpu suite (codecs on CUDA tensors, Triton kernels, the
#    DDP hook under NCCL at world size 1 on every collective path, non-default streams)
# 3. codec_throughput.json: every codec's encode/decode GB/s on 25M values on the device, beside a plain copy
#    (the device's memory bandwidth), fused (Triton) and eager
# 4. train.json / train.log: `commpress train` on one GPU over NCCL (world size 1), fp32 and
#    QSGD-4 with and without error feedback
#
# Without CUDA it runs its dry mode (CI does): the same steps on the CPU at smoke-test sizes,
# the GPU tests skipping with their reason, so the script cannot rot unseen. Exit status:
# non-zero if any step failed (each step still runs).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/gpu-results}
mkdir -p "$out"
failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run it with a time limit, logging its status
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - started)) s (log: $out/$name.log)"
  [ "$rc" = 0 ] || failed=1
}

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  mode=gpu
else
  mode=dry
fi
echo "mode: $mode (results in $out)"
{
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None,
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
  command -v nvidia-smi >/dev/null && nvidia-smi
} > "$out/env.txt" 2>&1

step tests_gpu 210 python -m pytest -q -rs tests/gpu --junitxml "$out/tests_gpu.xml"
if [ "$mode" = gpu ]; then
  step codec_throughput 150 python benchmarks/codec_throughput.py --device cuda \
    --sizes 25000000 --repeats 3 --out "$out/codec_throughput.json"
  step train 100 commpress train qsgd4 qsgd4+ef --policy fixed -n 1 --device cuda --backend nccl \
    --epochs 3 --quiet --json "$out/train.json"
else
  step codec_throughput 150 python benchmarks/codec_throughput.py --device cpu --quick \
    --out "$out/codec_throughput.json"
  step train 120 commpress train qsgd4 --policy fixed -n 1 --device cpu --backend gloo \
    --epochs 1 --quiet --json "$out/train.json"
fi
exit $failed
