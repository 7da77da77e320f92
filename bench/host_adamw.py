"""The host AdamW under optimizer offload, on this host's cores: DeepSpeed's CPU Adam against torch's
fused CPU AdamW (`deepspeed.offload_adam`), torch's with the clip folded in as `grad_scale`
(mmtrain.engine.offload), and the passes ZeRO-3 makes beside the update (the clip multiply of the
fp32 gradients, the bf16 conversion of the updated weights), at 1 thread and at up to 16.

    python3 -m bench.host_adamw --numel 400000000 --out bench/results/host_adamw_h100host.json

Best of 4 calls after one untimed call (which creates the moments). Needs DeepSpeed's CPU Adam op
(built on first use: a C++ compiler and ninja).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict


def _best_ms(fn: Callable[[], object], reps: int = 4) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1000, 1)


def main(argv=None) -> int:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mmtrain.engine.metrics import library_versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=400_000_000, help="elements of the one fp32 parameter")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    param = torch.nn.Parameter(torch.randn(args.numel))
    param.grad = torch.randn(args.numel)
    deepspeed_adam = DeepSpeedCPUAdam([param], lr=1e-4, weight_decay=0.1, adamw_mode=True)
    torch_adamw = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.1, fused=True)

    def torch_adamw_scaled() -> None:
        torch_adamw.grad_scale = torch.tensor(1.001)
        torch_adamw.step()
        del torch_adamw.grad_scale

    result: Dict[str, object] = {"numel": args.numel, "cpu_count": os.cpu_count(), "cpu": platform.processor(),
                                 "versions": library_versions(),
                                 "command": "python3 -m bench.host_adamw " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        with open("/proc/cpuinfo") as f:
            result["cpu"] = f.read().split("model name")[1].split("\n")[0].strip(" \t:")
    except (OSError, IndexError):
        pass
    for threads in sorted({1, min(16, os.cpu_count() or 1)}):
        torch.set_num_threads(threads)
        timings = {
            "deepspeed_cpu_adam_ms": _best_ms(deepspeed_adam.step),
            "clip_multiply_ms": _best_ms(lambda: param.grad.mul_(0.999)),
            "bf16_convert_ms": _best_ms(lambda: param.data.to(torch.bfloat16)),
            "torch_fused_ms": _best_ms(torch_adamw.step),
            "torch_fused_grad_scale_ms": _best_ms(torch_adamw_scaled),
        }
        result[f"threads_{threads}"] = timings
        print(threads, "threads:", json.dumps(timings), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
