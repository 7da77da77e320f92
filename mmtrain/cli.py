"""`mmtrain` command line: train, validate, export, eval, ls, demo.

    mmtrain train RECIPE [key=value ...] [--nproc N]
    mmtrain validate RECIPE [key=value ...] [--world-size N]
    mmtrain export RUN_DIR_OR_CHECKPOINT --out DIR [--dtype fp32|bf16] [--layout auto|published|mmtrain] [--max-shard-size 5GB]
    mmtrain eval MODEL_DIR --data SHARD_DIR [--max-samples N]
    mmtrain ls
    mmtrain demo [--workdir DIR] [key=value ...]
    mmtrain plan RECIPE [key=value ...] --gpus N --gpu-mem-gib M [--nodes K] [--host-mem-gib H] [--json]
    mmtrain doctor [--nproc N] [--shared-dir DIR] [--recipe RECIPE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional

from mmtrain.config import ConfigError, deepspeed_json, derive_batch, load_config, to_yaml


def _cmd_train(args, overrides: List[str]) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:
        # Not under a launcher yet: become one (torchrun, a free port, this host only), through the
        # agent that keeps the ranks' preemption exit code (plain torchrun turns it into 1).
        cmd = [sys.executable, "-m", "mmtrain.submit.agent", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "mmtrain.train", args.recipe, *overrides]
        return subprocess.call(cmd)
    from mmtrain.engine.distributed import exit_process
    from mmtrain.train import main as train_main

    # This process is itself a rank (a launcher's, or a world of one): it ends as mmtrain.train's do.
    exit_process(train_main([args.recipe, *overrides]))


def _cmd_validate(args, overrides: List[str]) -> int:
    cfg, warnings = load_config(args.recipe, overrides)
    derived = derive_batch(cfg, args.world_size)
    from mmtrain.engine.optim import check_model_section

    groups, trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
    derived["trainable_groups"] = [g for g in groups if g in trainable]
    derived["frozen_groups"] = [g for g in groups if g not in trainable]
    print("# resolved recipe")
    print(to_yaml(cfg))
    print("# derived")
    print(json.dumps(derived, indent=1))
    print("# deepspeed config")
    print(json.dumps(deepspeed_json(cfg, args.world_size), indent=1))
    for w in warnings:
        print(f"mmtrain: warning: {w}", file=sys.stderr)
    return 0


def _cmd_export(args, _overrides) -> int:
    from mmtrain.engine.export import export

    ckpt = export(args.path, args.out, dtype=args.dtype, layout=args.layout, max_shard_size=args.max_shard_size)
    with open(os.path.join(args.out, "export.json")) as f:
        summary = json.load(f)
    print(json.dumps({"checkpoint": ckpt, "out": args.out, "layout": summary["layout"], "files": len(summary["files"])}))
    return 0


def _cmd_eval(args, _overrides) -> int:
    from mmtrain.engine.offline import eval_exported

    result = eval_exported(args.model_dir, args.data, max_samples=args.max_samples,
                           max_new_tokens=args.max_new_tokens, template=args.template)
    print(json.dumps(result))
    return 0


def _cmd_ls(args, _overrides) -> int:
    from mmtrain.engine.offline import count_params
    from mmtrain.models.registry import list_specs

    print(f"{'name':<24} {'family':<10} {'total params':>15} {'trainable (default)':>20}"
          "  (published vocabularies; tiny flavours: 512 + 3 tokens)")
    for spec in list_specs():
        total, trainable = count_params(spec)
        print(f"{spec.name:<24} {spec.family:<10} {total:>15,} {trainable:>20,}")
    return 0


def _cmd_plan(args, overrides: List[str]) -> int:
    from mmtrain.engine.plan import run_plan

    try:
        code, text = run_plan(args.recipe, overrides, args.gpus, args.gpu_mem_gib, num_nodes=args.nodes,
                              host_mem_gib=args.host_mem_gib, as_json=args.json)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        print(f"mmtrain plan: {e}", file=sys.stderr)
        return 2
    print(text)
    if code:
        print("mmtrain plan: no configuration fits; see 'What would' above", file=sys.stderr)
    return code


def _cmd_doctor(args, _overrides) -> int:
    from mmtrain.engine.doctor import run_doctor

    shared_dir = args.shared_dir
    if shared_dir is None:
        shared_dir = load_config(args.recipe, [])[0].output_dir if args.recipe else "runs"
    code, text = run_doctor(args.nproc, shared_dir, timeout_s=args.timeout_s, as_json=args.json)
    if text:
        print(text)
    return code


def _cmd_demo(args, overrides) -> int:
    from mmtrain.demo import run_demo

    result = run_demo(args.workdir, nproc=args.nproc, overrides=overrides)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train from a recipe")
    p.add_argument("recipe")
    p.add_argument("--nproc", type=int, default=1, help="ranks to start on this host (CPU or GPUs)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("validate", help="print the resolved recipe and DeepSpeed JSON; builds nothing")
    p.add_argument("recipe")
    p.add_argument("--world-size", type=int, default=1)
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("export", help="checkpoint → model directory (HF sharded safetensors + config + tokenizer)")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--layout", choices=["auto", "published", "mmtrain"], default="auto",
                   help="published: the family's HF layout (IDEFICS, Fuyu) that transformers' from_pretrained loads; "
                        "mmtrain: mmtrain's parameter names; auto: published where the family has one")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MiB")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("eval", help="exact-match accuracy of generated answers on held-out shards")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True)
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--template", default=None, help="default: the template the model was trained with")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("ls", help="list model flavours with parameter counts")
    p.set_defaults(func=_cmd_ls)
    p = sub.add_parser("submit", help="write a cluster job for a recipe and submit it (slurm, sagemaker)")
    from mmtrain.submit import add_parsers as add_submit_parsers

    add_submit_parsers(p.add_subparsers(dest="target", required=True))
    p = sub.add_parser("plan", help="per-GPU memory by ZeRO stage and offload; recommends what fits; builds nothing")
    p.add_argument("recipe")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU, GiB")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--host-mem-gib", type=float, default=None, help="host memory per node, GiB (checks offload)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("doctor", help="check libraries, CUDA, an all-reduce over ranks and the shared filesystem")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start (default: the GPUs, or 2 on CPU); "
                                                         "ignored under a launcher (RANK/WORLD_SIZE set)")
    p.add_argument("--shared-dir", default=None, help="directory every rank must see (default: the recipe's "
                                                      "output_dir, else ./runs)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--timeout-s", type=int, default=120, help="collective timeout")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("demo", help="the demo job: synthetic VQA → train (2 ranks) → eval → export")
    p.add_argument("--workdir", default="demo_data")
    p.add_argument("--nproc", type=int, default=2)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb not in ("train", "validate", "submit", "plan", "demo") and rest:
        parser.error(f"unexpected arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest)
    except ConfigError as e:
        print(f"mmtrain: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
