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
