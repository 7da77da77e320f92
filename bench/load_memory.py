"""Host memory of streaming a published checkpoint into a ZeRO-3 partitioned model, per rank, vs the
checkpoint's size (2 CPU ranks, gloo; `mmtrain.engine.load.load_published`, as `model.init_from` runs it).

    python bench/load_memory.py                               # ~2.8 GB bf16 → bench/results/load_memory_cpu.json
    python bench/load_memory.py --format pt                   # the same weights as one checkpoint.pt → its
                                                              # `checkpoint_pt` section (the rest is kept)
    python bench/load_memory.py --hidden 1024 --vocab 16000 --out /tmp/load_small.json     # ~0.2 GB (the dist test)

The model is the IDEFICS layout (idefics-tiny's tiny vision tower and perceiver) made wide:
LLaMA-7B-sized decoder layers (hidden 4096, MLP 11008, 32 heads), 4 of them, a gated
cross-attention block before layers 0 and 2, a 32,000-token vocabulary: 1.41 B parameters, 2.82 GB
in bf16, largest tensor 262 MB (the embedding and the LM head).

Steps (each in its own process, so each peak is its own):
1. make: the checkpoint, written tensor by tensor under the published IDEFICS keys as HF shards
   (`mmtrain.models.weights.write_sharded`, 1 GB shards): random bf16, one tensor in memory at a time.
   `--format pt`: the same tensors in one `torch.save` file (as OpenFlamingo's checkpoint.pt; torch.save
   needs the whole state dict, so this step holds the checkpoint once). Cached in --workdir by
   configuration; `--delete` removes it after the run.
2. load (torchrun, 2 ranks): build the model under `deepspeed.zero.Init` (ZeRO-3, bf16; no deferred
   init: every weight is overwritten), record RSS (= baseline: interpreter, libraries and this
   rank's partitions), reset the high-water mark (`/proc/self/clear_refs` 5), `load_published`, record
   the high-water mark (VmHWM) and the end-of-process `ru_maxrss`; then `verify_loaded` gathers every
   parameter and compares it with the file (rank 0 reads it again).

Numbers per rank, bytes: `baseline_rss` (after the build), `peak_rss_load` (VmHWM during the load),
`load_growth` = peak - baseline, `ru_maxrss` (whole process life, build included), `partition_bytes`
(this rank's share of the parameters), and the checkpoint's size; `load_growth_over_checkpoint` is the
ratio to check. Page cache is not RSS: the reader `pread`s each tensor into its own buffer (a
checkpoint.pt's too: `weights.TorchCheckpoint` locates each tensor's bytes, then drops the mapping).
Alternative readers run the same loop for comparison (`--compare`): safetensors' `safe_open` and
whole-shard state dicts; for checkpoint.pt, `torch_mmap`, the tensors of `torch.load(mmap=True)`
copied straight from the mapping (mmtrain's reader before it located the bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import safetensors  # noqa: E402  (after the path set-up above)

from bench.loader import cpu_model  # noqa: E402
from mmtrain.engine.metrics import library_versions  # noqa: E402

DEFAULT_OUT = os.path.join(REPO, "bench", "results", "load_memory_cpu.json")
FORMATS = ("safetensors", "pt")
ALTERNATIVES = {"safetensors": ("safe_open", "shard_state_dict"), "pt": ("torch_mmap",)}
ALTERNATIVE_WHAT = {
    "safe_open": "rank 0 reads with safetensors.safe_open (one handle per shard)",
    "shard_state_dict": "every rank loads each shard's whole state dict (transformers 4.x's ZeRO-3 loading shape)",
    "torch_mmap": "rank 0 copies each tensor from torch.load(mmap=True, weights_only=True)'s views of the file "
                  "(mmtrain's TorchCheckpoint before it read located bytes with pread)",
}
# The JSON section a --format pt run writes; a safetensors run writes the top level and keeps it.
PT_SECTION = "checkpoint_pt"


def _status() -> dict:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_args(args) -> tuple:
    """(flavour, overrides, token ids) of the wide IDEFICS-layout model."""
    heads = args.hidden // 128
    overrides = {
        "decoder": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": heads,
                    "num_key_value_heads": heads, "intermediate_size": args.intermediate or int(args.hidden * 2.6875)},
        "cross_attn_num_heads": heads,
        "cross_attn_head_dim": 128,
        "cross_attn_every_n_layers": 2,
    }
    vocab = args.vocab
    token_ids = dict(image=vocab + 1, fake_image=vocab, bos=1, eos=2, pad=0, base_vocab_size=vocab, num_added_tokens=2)
    return "idefics-tiny", overrides, token_ids


def _checkpoint_dir(args) -> str:
    if args.format == "pt":
        key = json.dumps([model_args(args), "pt", args.seed], sort_keys=True)
        return os.path.join(args.workdir, "ckpt-" + hashlib.sha1(key.encode()).hexdigest()[:10] + ".pt")
    key = json.dumps([model_args(args), args.max_shard_size, args.seed], sort_keys=True)
    return os.path.join(args.workdir, "ckpt-" + hashlib.sha1(key.encode()).hexdigest()[:10])


# ----------------------------------------------------------------------------------------------
# 1. make


def make(args) -> dict:
    import torch

    from mmtrain.models.registry import build_model
    from mmtrain.models.weights import WriteEntry, layout_of, parse_size, write_sharded

    flavour, overrides, token_ids = model_args(args)
    with torch.device("meta"):
        model = build_model(flavour, overrides, token_ids)
    layout = layout_of(model)
    names = [name for name, _ in model.named_parameters()]
    entries = [WriteEntry(key=layout.to_published(name), source=name, shape=tuple(p.shape), dtype=torch.bfloat16)
               for name, p in model.named_parameters()]

    def fetch(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed * 100_003 + names.index(name))
        shape = dict(model.named_parameters())[name].shape
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)

    out = args.checkpoint
    tmp = out + ".partial"
    start_rss = _status()["VmRSS"]
    start = time.perf_counter()
    if args.format == "pt":
        torch.save({entry.key: fetch(entry.source) for entry in entries}, tmp)
        total_bytes, num_files = sum(entry.nbytes for entry in entries), 1
    else:
        index = write_sharded(tmp, entries, fetch, parse_size(args.max_shard_size))
        total_bytes, num_files = index["metadata"]["total_size"], len(set(index["weight_map"].values()))
    os.replace(tmp, out)
    return {"checkpoint_bytes": total_bytes, "num_tensors": len(entries),
            "num_files": num_files, "largest_tensor_bytes": max(e.nbytes for e in entries),
            "num_params": sum(p.numel() for p in model.parameters()),
            "make_s": time.perf_counter() - start, "make_start_rss": start_rss, "make_peak_rss": _status()["VmHWM"]}


# ----------------------------------------------------------------------------------------------
# 2. load (one rank)


def worker(args) -> None:
    import torch

    from mmtrain.engine.distributed import barrier, destroy, init_distributed

    start_rss = _status()
    dist = init_distributed(1800)
    import deepspeed

    from mmtrain.engine.load import load_published, verify_loaded
    from mmtrain.models.registry import build_model

    flavour, overrides, token_ids = model_args(args)
    ds_config = {"train_batch_size": dist.world_size, "train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    torch.manual_seed(0)
    build_start = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(flavour, overrides, token_ids, init_deferred=False)
    build_s = time.perf_counter() - build_start
    partition_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    barrier()
    # The build leaves freed heap pages in the process; hand them back so the baseline is what is
    # live, and no reader's peak hides in pages the build left behind.
    from mmtrain.models.weights import release_freed_memory

    release_freed_memory()
    baseline = _status()
    peak_reset = _reset_peak()
    load_start = time.perf_counter()
    if args.reader == "mmtrain":
        num_loaded = len(load_published(model, args.checkpoint).entries)
    else:
        num_loaded = _load_alternative(model, args.checkpoint, args.reader, dist.rank)
    load_s = time.perf_counter() - load_start
    after = _status()
    barrier()
    result = {
        "rank": dist.rank,
        "start_rss": start_rss["VmRSS"],
        "baseline_rss": baseline["VmRSS"],
        "baseline_rss_anon": baseline["RssAnon"],
        "peak_rss_load": after["VmHWM"] if peak_reset else None,
        "load_growth": (after["VmHWM"] - baseline["VmRSS"]) if peak_reset else None,
        "rss_after_load": after["VmRSS"],
        "rss_file_after_load": after["RssFile"],
        "ru_maxrss_after_load": _ru_maxrss(),
        "partition_bytes": partition_bytes,
        "build_s": build_s,
        "load_s": load_s,
        "num_loaded": num_loaded,
    }
    if args.verify:
        verify_start = time.perf_counter()
        result["differing"] = verify_loaded(model, args.checkpoint)
        result["verify_s"] = time.perf_counter() - verify_start
    with open(os.path.join(args.rank_dir, f"rank{dist.rank}.json"), "w") as f:
        json.dump(result, f)
    destroy()


def _load_alternative(model, checkpoint_dir: str, reader: str, rank: int) -> int:
    """The same ZeRO-3 gather/copy loop fed by the readers mmtrain does not use, for comparison:

    safe_open: rank 0 reads through safetensors' safe_open, one handle per shard kept open while
    the shard is read (tensors are views of its mmap; touched pages stay resident until it closes).
    shard_state_dict: every rank loads each shard whole (`safetensors.torch.load_file`), then copies
    from it: the shape of transformers 4.x's ZeRO-3 loading (a state dict per shard on every rank;
    with safetensors 0.8 its tensors are mmap views too, so only the pages rank 0 touches count).
    torch_mmap (checkpoint.pt): rank 0 copies from the views of `torch.load(mmap=True)`, the file's
    one mapping open for the whole load.
    All free memory after each parameter as load_published does, so only the reader differs.
    """
    import deepspeed
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmtrain.models.weights import open_checkpoint, release_freed_memory

    with open_checkpoint(checkpoint_dir) as checkpoint:  # headers only: which keys are in which file
        shards = {}
        for key in checkpoint.keys():
            shards.setdefault(checkpoint.info(key).file, []).append(key)
    params = dict(model.named_parameters())  # published IDEFICS keys are our names
    for path, keys in sorted(shards.items()):
        if reader == "torch_mmap":
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True) if rank == 0 else None
            get = state.__getitem__ if state is not None else None
        elif reader == "safe_open":
            handle = safe_open(path, "pt") if rank == 0 else None
            get = handle.get_tensor if handle is not None else None
        else:
            state = load_file(path)
            get = state.__getitem__
        for key in keys:
            with deepspeed.zero.GatheredParameters([params[key]], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        params[key].data.copy_(get(key))
            release_freed_memory()  # as load_published does: only the reader differs
        get = handle = state = None  # noqa: F841  (closes the handle / frees the shard's state dict)
    return sum(len(keys) for keys in shards.values())


# ----------------------------------------------------------------------------------------------
# driver


def _forward(args, *extra: str) -> list:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--intermediate", str(args.intermediate or 0), "--max-shard-size", args.max_shard_size,
            "--seed", str(args.seed), "--format", args.format, "--checkpoint", args.checkpoint, *extra]


def run(args) -> dict:
    os.makedirs(args.workdir, exist_ok=True)
    args.checkpoint = args.checkpoint or _checkpoint_dir(args)
    script = os.path.abspath(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    made_path = args.checkpoint + ".make.json"  # the generation's own numbers, kept with the cached checkpoint
    if not os.path.exists(args.checkpoint):
        done = subprocess.run([sys.executable, script, "make", *_forward(args)], capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError("make failed:\n" + done.stdout[-3000:] + done.stderr[-3000:])
        with open(made_path, "w") as f:
            f.write(done.stdout.strip().splitlines()[-1])
    made = json.load(open(made_path)) if os.path.isfile(made_path) else None
    def launch(reader: str, verify: bool) -> list:
        rank_dir = os.path.join(args.workdir, "ranks")
        os.makedirs(rank_dir, exist_ok=True)
        for name in os.listdir(rank_dir):
            os.remove(os.path.join(rank_dir, name))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", script,
               "worker", *_forward(args, "--rank-dir", rank_dir, "--reader", reader, "--verify" if verify else "--no-verify")]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
        if done.returncode:
            raise RuntimeError(f"load ({reader}) failed:\n" + done.stdout[-4000:] + done.stderr[-4000:])
        return [json.load(open(os.path.join(rank_dir, f"rank{r}.json"))) for r in range(args.nproc)]

    ranks = launch("mmtrain", args.verify)
    alternatives = {reader: launch(reader, False) for reader in args.compare}

    from mmtrain.models.weights import open_checkpoint

    with open_checkpoint(args.checkpoint) as checkpoint:
        checkpoint_bytes = checkpoint.total_bytes
        largest = max(checkpoint.info(k).nbytes for k in checkpoint.keys())
        num_files = len({checkpoint.info(k).file for k in checkpoint.keys()})
    for rank in ranks + [rank for rows in alternatives.values() for rank in rows]:
        if rank["load_growth"] is not None:
            rank["load_growth_over_checkpoint"] = rank["load_growth"] / checkpoint_bytes
            rank["load_growth_over_largest_tensor"] = rank["load_growth"] / largest
    kind = {"safetensors": "an HF sharded safetensors checkpoint",
            "pt": "a torch.save checkpoint.pt (read as OpenFlamingo's)"}[args.format]
    return {
        "bench": "load_memory",
        "what": f"load_published (model.init_from) of {kind} into a ZeRO-3 partitioned model, 2 CPU ranks "
                "(gloo): per-rank RSS vs checkpoint size",
        "command": " ".join(["python", "bench/load_memory.py", *args.argv]),
        "device": f"CPU: {cpu_model()} ({os.cpu_count()} cores), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "versions": {**library_versions(), "safetensors": safetensors.__version__, "python": platform.python_version()},
        "format": args.format,
        "model": {"flavour": "idefics-tiny (widened)", "overrides": model_args(args)[1],
                  "vocab": args.vocab, "dtype": "bf16"},
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_files": num_files,
        "largest_tensor_bytes": largest,
        "make": made,
        "world_size": args.nproc,
        "ranks": ranks,
        "max_load_growth_over_checkpoint": max((r.get("load_growth_over_checkpoint") or 0) for r in ranks),
        "verified": all(r.get("differing") == [] for r in ranks) if args.verify else None,
        "alternatives": {
            reader: {"what": ALTERNATIVE_WHAT[reader],
                     "max_load_growth_over_checkpoint": max((r.get("load_growth_over_checkpoint") or 0) for r in rows),
                     "ranks": rows}
            for reader, rows in alternatives.items()
        },
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "make", "worker"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width; 0: 2.6875 x hidden (LLaMA-7B's 11008)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--format", default="safetensors", choices=FORMATS,
                        help="checkpoint file format: HF sharded safetensors, or one torch.save checkpoint.pt")
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/mmtrain-bench-load")
    parser.add_argument("--checkpoint", default=None, help="default: cached under --workdir by configuration")
    parser.add_argument("--rank-dir", default=None)
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timeout-s", type=int, default=3600)
    readers = sorted({reader for names in ALTERNATIVES.values() for reader in names})
    parser.add_argument("--reader", default="mmtrain", choices=["mmtrain", *readers], help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs="*", default=None, choices=readers,
                        help="also load with these readers, for comparison (default: the format's; none: "
                             "--compare with no names)")
    parser.add_argument("--delete", action="store_true", help="remove the checkpoint after the run (not cached)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.compare is None:
        args.compare = list(ALTERNATIVES[args.format])
    wrong = [reader for reader in args.compare if reader not in ALTERNATIVES[args.format]]
    if wrong:
        parser.error(f"--compare {wrong}: not readers of --format {args.format} (those: {list(ALTERNATIVES[args.format])})")
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.mode == "make":
        print(json.dumps(make(args)))
        return 0
    if args.mode == "worker":
        from mmtrain.engine.distributed import exit_process

        worker(args)
        exit_process(0)  # not interpreter teardown, where a gloo thread can abort the rank (see exit_process)
    try:
        result = run(args)
    finally:
        if args.delete and args.checkpoint and os.path.exists(args.checkpoint):
            (shutil.rmtree if os.path.isdir(args.checkpoint) else os.remove)(args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # One file, two sections: a safetensors run is the top level, a checkpoint.pt run its PT_SECTION;
    # each run replaces its own and keeps the other's.
    previous = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    if args.format == "pt":
        written = {**previous, PT_SECTION: result}
    else:
        written = {**result, **({PT_SECTION: previous[PT_SECTION]} if PT_SECTION in previous else {})}
    with open(args.out, "w") as f:
        json.dump(written, f, indent=1)
        f.write("\n")
    summary = {k: result[k] for k in ("checkpoint_bytes", "max_load_growth_over_checkpoint", "verified")}
    summary["load_growth_per_rank"] = [r["load_growth"] for r in result["ranks"]]
    for reader, alt in result["alternatives"].items():
        summary[f"{reader}_load_growth_per_rank"] = [r["load_growth"] for r in alt["ranks"]]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
