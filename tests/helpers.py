"""Helpers shared by the dist and e2e tests: the demo data at a chosen size and rank launching."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "recipes", "tiny", "otter_shapes.yaml")


def make_shapes_dataset(root: str, num_train: int, num_eval: int) -> dict:
    """The demo's data at a chosen size: raw MIMIC-IT layout → shards (4 per split), plus a tokenizer."""
    from mmtrain.demo import make_shapes_data

    return make_shapes_data(root, num_train, num_eval, shard_samples=max(1, num_train // 4))


def data_overrides(paths: dict, run_root: str, run_name: str) -> list:
    return [
        f"output_dir={run_root}",
        f"run_name={run_name}",
        f"model.tokenizer={paths['tokenizer']}",
        f"data.sources[0].path={paths['train']}",
        f"data.eval_path={paths['eval']}",
    ]


def run_ranks(nproc: int, module_args: list, timeout_s: int = 600, env: dict = None):
    """Start `nproc` ranks of `python -m ...` with torchrun on this host; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=REPO)


def randomise_like_trained(model, seed: int = 1):
    """Random weights unlike any initialisation, in place: open gates, non-unit norms, so parity and
    round-trip tests cannot pass on what zero gates or unit norms would hide. Returns the model."""
    import re

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                param.copy_(0.6 + 0.3 * noise)
            elif re.search(r"(norm\d?|\.ln|layernorm)\.weight$", name):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return model
