"""GPU-node environment fixes that must happen before the process group starts.

Consumer cards (RTX 3090, 4090 and similar) often lack peer-to-peer access between GPUs of one
host, or have it reported but broken; NCCL's P2P transport then hangs or corrupts collectives
(DeepSpeed#4433, accelerate#2328). NCCL falls back to shared host memory when NCCL_P2P_DISABLE=1,
so where any pair of this host's GPUs lacks peer access we set it, and say so.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, List, MutableMapping, Optional, Tuple

P2P_ENV = "NCCL_P2P_DISABLE"

log = logging.getLogger("mmtrain")


def pairs_without_peer_access(num_gpus: int, can_access_peer: Callable[[int, int], bool]) -> List[Tuple[int, int]]:
    """Ordered GPU pairs (a, b) of this host where a cannot reach b's memory directly.

    Both directions are asked: access is not always symmetric, and NCCL uses both.
    """
    return [(a, b) for a, b in itertools.permutations(range(num_gpus), 2) if not can_access_peer(a, b)]


def configure_p2p(num_gpus: int, can_access_peer: Callable[[int, int], bool],
                  env: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set NCCL_P2P_DISABLE=1 in `env` when some pair of the host's GPUs lacks peer access.

    A value the user set is left alone (they may know their topology better). Returns the message
    logged when the variable was set (by local rank 0 only; the others set it silently), else None.
    """
    env = os.environ if env is None else env
    if num_gpus < 2 or P2P_ENV in env:
        return None
    missing = pairs_without_peer_access(num_gpus, can_access_peer)
    if not missing:
        return None
    env[P2P_ENV] = "1"
    if env.get("LOCAL_RANK", "0") != "0":
        return None  # every rank of the host decides alike; one of them says so
    shown = ", ".join(f"{a}->{b}" for a, b in missing[:8]) + (" ..." if len(missing) > 8 else "")
    message = (f"GPU pairs without peer-to-peer access ({shown}), as on consumer cards such as the "
               f"RTX 4090: set {P2P_ENV}=1 so NCCL goes through host memory instead of hanging. "
               f"Set {P2P_ENV}=0 yourself to keep P2P.")
    log.warning(message)
    return message


def prepare_gpu_environment() -> Optional[str]:
    """Apply :func:`configure_p2p` to the GPUs this process sees (all GPUs of the host: launchers
    leave CUDA_VISIBLE_DEVICES covering every local rank's device). No-op without two GPUs."""
    import torch

    if not torch.cuda.is_available():
        return None
    return configure_p2p(torch.cuda.device_count(), torch.cuda.can_device_access_peer)
