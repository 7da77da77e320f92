"""`mmtrain demo` (`make demo`): the whole path of a run on a task only images can answer.

1. `mmtrain-data synth shapes` draws a visual-question set in MIMIC-IT's raw layout (a shape of some
   colour per image; some episodes carry 1-2 in-context examples with their own images);
2. `mmtrain-data convert mimicit` turns it into webdataset shards; `mmtrain-data tokenizer train`
   trains a tiny tokenizer on its text;
3. `mmtrain train recipes/tiny/otter_shapes.yaml --nproc 2` trains the tiny Otter with DeepSpeed
   ZeRO-3 (CPU or GPU);
4. `mmtrain export` and `mmtrain eval` score greedy answers on held-out episodes.

It prints one JSON line: accuracy, chance (the best any image-blind guesser scores: the most
frequent training answer for each question text), steps and wall time.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "otter_shapes.yaml")
NUM_TRAIN_EPISODES = 6000
NUM_EVAL_EPISODES = 300


def _run(args: List[str], capture: bool = False) -> str:
    """Run one step; its output goes to stderr (stdout is kept for the final JSON line) or is returned."""
    print("+ " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(args, stdout=subprocess.PIPE if capture else sys.stderr, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo step failed ({done.returncode}): {' '.join(args)}")
    return done.stdout


def _final_turns(instructions_json: str, train_config_json: str) -> List[Dict]:
    """The target turn of every episode: train_config keys, or every instruction without one."""
    with open(instructions_json) as f:
        data = json.load(f)["data"]
    keys = list(data)
    if os.path.isfile(train_config_json):
        with open(train_config_json) as f:
            keys = list(json.load(f))
    return [data[k] for k in keys]


def image_blind_chance(train_raw: str, eval_raw: str, prefix: str = "SHAPES") -> float:
    """Accuracy of answering each eval question with the training set's most frequent answer to it."""
    def turns(d):
        return _final_turns(os.path.join(d, f"{prefix}_instructions.json"), os.path.join(d, f"{prefix}_train.json"))

    by_question: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for turn in turns(train_raw):
        by_question[turn["instruction"]][turn["answer"]] += 1
    eval_turns = turns(eval_raw)
    hits = 0
    for turn in eval_turns:
        counts = by_question.get(turn["instruction"])
        hits += int(bool(counts) and counts.most_common(1)[0][0] == turn["answer"])
    return hits / max(1, len(eval_turns))


def make_shapes_data(workdir: str, num_train: int, num_eval: int, shard_samples: int = 1000) -> Dict[str, str]:
    """Raw MIMIC-IT-layout train and held-out sets, their shards, and a tokenizer; returns the paths."""
    data_cli = [sys.executable, "-m", "data_tools.cli"]
    paths = {name: os.path.join(workdir, name) for name in ("raw_train", "raw_eval", "train", "eval", "tokenizer")}
    for split, n, seed in (("train", num_train, 1), ("eval", num_eval, 2)):
        raw = paths[f"raw_{split}"]
        _run(data_cli + ["synth", "shapes", "--out", raw, "--num-episodes", str(n), "--seed", str(seed)])
        _run(data_cli + ["convert", "mimicit", "--instructions", os.path.join(raw, "SHAPES_instructions.json"),
                         "--images", os.path.join(raw, "SHAPES.parquet"),
                         "--train-config", os.path.join(raw, "SHAPES_train.json"), "--out", paths[split],
                         "--shard-samples", str(shard_samples)])
    _run(data_cli + ["tokenizer", "train", "--out", paths["tokenizer"],
                     "--instructions", os.path.join(paths["raw_train"], "SHAPES_instructions.json")])
    return paths


def run_demo(workdir: str, nproc: int = 2, overrides: Sequence[str] = ()) -> Dict:
    """`overrides` (key=value) go to the training run after the demo's own, e.g. data.image_decode=device."""
    import torch

    if torch.cuda.is_available():
        # One rank per GPU: on a GPU machine the ranks run there (no more ranks than GPUs).
        nproc = min(nproc, torch.cuda.device_count())
    start = time.time()
    py = sys.executable
    paths = make_shapes_data(workdir, NUM_TRAIN_EPISODES, NUM_EVAL_EPISODES)
    paths.update({name: os.path.join(workdir, name) for name in ("runs", "export")})
    # A demo always starts from scratch: a previous demo run must not be resumed.
    shutil.rmtree(os.path.join(paths["runs"], "otter_shapes"), ignore_errors=True)
    train_start = time.time()
    _run([py, "-m", "mmtrain.cli", "train", RECIPE, "--nproc", str(nproc), f"output_dir={paths['runs']}",
          f"model.tokenizer={paths['tokenizer']}", f"data.sources[0].path={paths['train']}",
          f"data.eval_path={paths['eval']}", "resume=none", *overrides])
    train_s = time.time() - train_start
    run_dir = os.path.join(paths["runs"], "otter_shapes")
    _run([py, "-m", "mmtrain.cli", "export", run_dir, "--out", paths["export"]])
    eval_start = time.time()
    result = json.loads(_run([py, "-m", "mmtrain.cli", "eval", paths["export"], "--data", paths["eval"],
                              "--max-samples", str(NUM_EVAL_EPISODES), "--max-new-tokens", "6"],
                             capture=True).strip().splitlines()[-1])
    eval_s = time.time() - eval_start
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    return {
        "accuracy": result["accuracy"],
        "chance": image_blind_chance(paths["raw_train"], paths["raw_eval"]),
        "num_eval": result["num_samples"],
        "steps": steps[-1]["step"],
        "final_loss": steps[-1]["loss"],
        "world_size": nproc,
        "overrides": list(overrides),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "wall_s": round(time.time() - start, 1),
        "examples": result["examples"][:3],
    }
