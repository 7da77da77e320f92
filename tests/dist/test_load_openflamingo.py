"""OpenFlamingo's three-part release under 2-rank ZeRO-3 on CPU (`model.init_from: [base LM dir,
open_clip state dict, checkpoint.pt]`), and init_from on resume, in three runs of one test:

1. A run starts from the release: every gathered parameter equals its source's tensor; a source
   list that lacks a key fails on every rank, naming the key; it trains 4 steps (checkpoints at 2, 4).
2. Resumed from step 2 with the release gone: the checkpoint holds every weight (DeepSpeed saves the
   frozen ones as fragments beside the module states), so init_from is skipped (logged) and the
   step-4 weights equal the uninterrupted run's bit for bit.
3. Resumed from step 2 of a checkpoint stripped of its frozen fragments (as DeepSpeed writes it with
   `exclude_frozen_parameters=True`) with the release's trainable tensors turned to NaN: the frozen
   weights are read from init_from and the trainable ones are not; the step-4 weights equal again.
"""

import glob
import json
import os
import re
import shutil

import pytest
import torch
from helpers import TINY_RECIPE, data_overrides, openflamingo_release, randomise_like_trained, run_ranks

pytestmark = pytest.mark.dist

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init_from_openflamingo_probe.py")
FLAVOUR = "openflamingo-tiny-mpt"
TRAINABLE = ["perceiver", "cross_attn", "new_tokens"]
FAST = [
    f"model.name={FLAVOUR}",
    f"model.trainable=[{','.join(TRAINABLE)}]",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "data.eval_path=null",
    "resume=auto",
]
# A key of checkpoint.pt that the broken source list lacks.
DROPPED_KEY = "perceiver.layers.0.0.to_q.weight"


def _release(shapes_data, out):
    """The release of a randomly "trained" openflamingo-tiny-mpt for the run's tokenizer; its state dict."""
    from mmtrain.data.tokenizer import TokenIds, load_tokenizer
    from mmtrain.models import build_model

    ids = TokenIds.from_tokenizer(load_tokenizer(shapes_data["tokenizer"], "simple"), "simple").as_dict()
    torch.manual_seed(123)
    model = randomise_like_trained(build_model(FLAVOUR, {}, ids), seed=3)
    sources = openflamingo_release(model, out, base_table_rows=ids["base_vocab_size"] + 6)
    return sources, model.state_dict(), ids


def _weights(ckpt_dir):
    """Every parameter of a run checkpoint, as the export reads them (trainable: fp32 masters)."""
    from mmtrain.engine.export import ZeroCheckpointTensors

    tensors = ZeroCheckpointTensors(ckpt_dir)
    return {name: tensors.get(name).clone() for name in tensors.names()}


def _resumable_copy(run_dir, copy_dir):
    """The run as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(run_dir, copy_dir)
    shutil.rmtree(os.path.join(copy_dir, "checkpoints", "step_0000004"))
    with open(os.path.join(copy_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_0000002\n")
    return os.path.join(copy_dir, "checkpoints", "step_0000002")


def _log_since_copy(run_dir, copied_log):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read()[len(copied_log):]


def test_openflamingo_release_zero3_and_resume_skips_init_from(shapes_data, tmp_path):
    release = str(tmp_path / "release")
    sources, state, ids = _release(shapes_data, release)
    trained = torch.load(sources[2], weights_only=True)
    assert DROPPED_KEY in trained
    broken = os.path.join(release, "checkpoint_missing.pt")
    torch.save({k: v for k, v in trained.items() if k != DROPPED_KEY}, broken)

    # 1. The run from the release.
    root = str(tmp_path / "runs")
    probe_dir = str(tmp_path / "probe")
    os.makedirs(probe_dir)
    init_from = f"model.init_from=[{','.join(sources)}]"
    args = [*data_overrides(shapes_data, root, "full"), *FAST, init_from]
    done = run_ranks(2, [PROBE, TINY_RECIPE, probe_dir, ",".join([*sources[:2], broken]), *args])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [json.load(open(os.path.join(probe_dir, f"rank{r}.json"))) for r in range(2)]
    for probe in ranks:
        # Every parameter of the partitioned model is its source's (bf16 run: the sources' values in bf16).
        assert probe["differing"] == [] and probe["num_params"] == len(state)
        assert probe["steps"] == 4
        # The missing key, raised on this rank too (rank 0 matched the files, every rank raised its error).
        assert probe["error"] and "missing 1 keys" in probe["error"] and DROPPED_KEY in probe["error"], probe["error"]
    assert ranks[0]["error"] == ranks[1]["error"]
    full_dir = os.path.join(root, "full")
    full = _weights(os.path.join(full_dir, "checkpoints", "step_0000004"))
    trainable = {name for name in full if name.startswith(("perceiver.", "gated_cross_attn_layers."))
                 or ".additional_" in name}
    frozen = sorted(set(full) - trainable)
    assert set(full) == set(state) and len(frozen) > len(trainable) > 0
    # The frozen weights are the release's after 4 steps; the checkpoint holds them.
    assert [n for n in frozen if not torch.equal(full[n], state[n].to(torch.bfloat16))] == []
    with open(os.path.join(full_dir, "train.log")) as f:
        full_log = f.read()
    assert "init_from skipped" not in full_log

    # 2. Resume from step 2 with the release gone: nothing of it is read.
    resumed_dir = os.path.join(root, "resumed")
    _resumable_copy(full_dir, resumed_dir)
    gone = release + ".gone"
    os.rename(release, gone)
    args = [*data_overrides(shapes_data, root, "resumed"), *FAST, init_from]
    done = run_ranks(2, ["-m", "mmtrain.train", TINY_RECIPE, *args])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    log = _log_since_copy(resumed_dir, full_log)
    assert "init_from skipped: the checkpoint at step 2" in log and "resumed from" in log, log[-3000:]
    resumed = _weights(os.path.join(resumed_dir, "checkpoints", "step_0000004"))
    assert resumed.keys() == full.keys()
    assert [n for n in full if not torch.equal(resumed[n], full[n])] == []

    # 3. A checkpoint without frozen fragments: those come from init_from, whose trainable tensors
    # are NaN now (read, they would show in the count of tensors read below).
    os.rename(gone, release)
    nan_trained = {}
    for key, value in trained.items():
        if key.startswith("perceiver.") or ".gated_cross_attn_layer." in key:
            value = torch.full_like(value, float("nan"))
        elif value.shape[0] == ids["base_vocab_size"] + ids["num_added_tokens"]:  # the token table's added rows
            value = torch.cat([value[: ids["base_vocab_size"]], torch.full_like(value[ids["base_vocab_size"]:], float("nan"))])
        nan_trained[key] = value
    torch.save(nan_trained, sources[2])
    stripped_dir = os.path.join(root, "stripped")
    step2 = _resumable_copy(full_dir, stripped_dir)
    model_states = sorted(glob.glob(os.path.join(step2, "zero_pp_rank_*_mp_rank_00_model_states.pt")))
    assert len(model_states) == 2
    for path in model_states:
        saved = torch.load(path, weights_only=False)
        assert set(saved["frozen_param_fragments"]) == set(frozen)
        saved["frozen_param_fragments"] = saved["frozen_param_shapes"] = None
        torch.save(saved, path)
    args = [*data_overrides(shapes_data, root, "stripped"), *FAST, init_from]
    done = run_ranks(2, ["-m", "mmtrain.train", TINY_RECIPE, *args])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    stripped = _weights(os.path.join(stripped_dir, "checkpoints", "step_0000004"))
    assert [n for n in full if not torch.equal(stripped[n], full[n])] == []
    log = _log_since_copy(stripped_dir, full_log)
    holds = f"holds {len(trainable)} of {len(full)} parameters; reading the other {len(frozen)} from init_from"
    assert holds in log, log[-3000:]
    read = re.search(r"init_from \S+ .*: (\d+) tensors", log)
    assert read and int(read.group(1)) == len(frozen), log[-3000:]
