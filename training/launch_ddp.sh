#!/usr/bin/env bash
# Launch a training recipe on all GPUs of this node with torchrun (DDP, one process a GPU).
#   training/launch_ddp.sh NUM_GPUS distill --data /data/sa1b --teacher-checkpoint sam_vit_h_4b8939.pth --out runs/s1
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous) on each.
set -euo pipefail
NGPU="${1:?usage: launch_ddp.sh NUM_GPUS RECIPE [options]}"
shift
# NVLink multicast off: some shared hosts forbid it.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NGPU" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m training "$@"
