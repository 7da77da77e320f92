#!/usr/bin/env bash
# Run a recipe on this host with NGPU ranks (one per GPU; CPU processes where there is no GPU).
#   launch/local.sh recipes/tiny/otter_shapes.yaml train.max_steps=100
#   NGPU=8 launch/local.sh recipes/<family>/<recipe>.yaml
#   LAUNCHER=deepspeed NGPU=8 launch/local.sh recipes/<family>/<recipe>.yaml
# Rank, world size and the rendezvous come from the launcher; mmtrain reads them from the environment.
# docs/launching.md has the other paths (several nodes, consumer GPUs, Slurm, SageMaker).
set -euo pipefail
PYTHON=${PYTHON:-python}
NGPU=${NGPU:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
LAUNCHER=${LAUNCHER:-torchrun}
case "$LAUNCHER" in
  torchrun)
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m mmtrain.train "$@" ;;
  deepspeed)
    # The runner's own module (the `deepspeed` script runs the same); it spells "run a module" --module.
    # On a CPU host --num_gpus is the number of rank processes.
    exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NGPU" --master_port "${MASTER_PORT:-29500}" \
      --module mmtrain.train "$@" ;;
  *)
    echo "launch/local.sh: LAUNCHER=$LAUNCHER: use torchrun or deepspeed" >&2
    exit 2 ;;
esac
