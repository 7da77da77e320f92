#!/usr/bin/env bash
# Run a recipe on this host with NGPU ranks (one per GPU; CPU processes where there is no GPU).
#   launch/local.sh recipes/tiny/otter_shapes.yaml train.max_steps=100
#   NGPU=8 launch/local.sh recipes/<family>/<recipe>.yaml
# Rank, world size and the rendezvous come from torchrun; mmtrain reads them from the environment.
set -euo pipefail
PYTHON=${PYTHON:-python}
NGPU=${NGPU:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m mmtrain.train "$@"
