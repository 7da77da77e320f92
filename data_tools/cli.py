"""`mmtrain-data`: build and look at mmtrain datasets.

    mmtrain-data convert mmc4 DOCS.jsonl[.gz|.zip]... --out DIR [--images-dir DIR] [--assignment matched|hungarian]
        [--sim-threshold 0.24] [--min-image-bytes 10240] [--keep-text-only] [COMMON]
    mmtrain-data convert obelics ROWS.parquet... --out DIR [--image-store IMG2DATASET_DIR]
        [--on-missing-image drop-image|drop-document] [--keep-text-only] [COMMON]
    mmtrain-data convert mimicit --instructions X_instructions.json --images X.parquet [...] --out DIR
        [--train-config X_train.json] [--in-context train-config|rel-ins|none] [--video] [COMMON]
    mmtrain-data convert pairs SRC_DIR_OR_TAR... [--out DIR] [--force] [--quiet]
        COMMON: [--shard-mib 256] [--shard-samples 1000] [--source NAME] [--force] [--quiet]
    mmtrain-data synth shapes --out DIR --num-episodes N --seed S [--image-size-px 64] [--context-fraction 0.5]
    mmtrain-data tokenizer train --out DIR --instructions A_instructions.json [B ...] [--vocab-size 512]
    mmtrain-data inspect DIR [--num 3] [--verify] [--scan-shards 1] [--html OUT.html] [--png OUT.png]

Conversions are streaming, resumable (re-run the same command after an interruption) and
idempotent (a re-run over a complete output does nothing); `--force` starts over. See
data_tools/sharding.py for the journal, and each converter's module for its input format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from . import DataToolError


def _run_options(args) -> dict:
    return dict(shard_samples=args.shard_samples, shard_mib=args.shard_mib, force=args.force, quiet=args.quiet)


def _cmd_convert_mimicit(args) -> int:
    from .mimicit import convert_mimicit

    print(convert_mimicit(args.instructions, args.images, args.out, train_config_path=args.train_config,
                          in_context=args.in_context, source=args.source, video=args.video,
                          **_run_options(args)).summary())
    return 0


def _cmd_convert_mmc4(args) -> int:
    from .mmc4 import convert_mmc4

    print(convert_mmc4(args.inputs, args.out, images_dir=args.images_dir, assignment=args.assignment,
                       sim_threshold=args.sim_threshold, min_image_bytes=args.min_image_bytes,
                       keep_text_only=args.keep_text_only, source=args.source or "mmc4",
                       **_run_options(args)).summary())
    return 0


def _cmd_convert_obelics(args) -> int:
    from .obelics import convert_obelics

    print(convert_obelics(args.inputs, args.out, image_store=args.image_store, on_missing_image=args.on_missing_image,
                          keep_text_only=args.keep_text_only, source=args.source or "obelics",
                          **_run_options(args)).summary())
    return 0


def _cmd_convert_pairs(args) -> int:
    from .pairs import index_pairs

    print(index_pairs(args.sources, args.out, force=args.force, quiet=args.quiet).summary())
    return 0


def _cmd_synth_shapes(args) -> int:
    from .synthetic import synth_shapes

    paths = synth_shapes(args.out, args.num_episodes, seed=args.seed, image_size_px=args.image_size_px,
                         context_fraction=args.context_fraction, prefix=args.prefix)
    print(f"wrote {args.num_episodes} episodes: " + ", ".join(paths[k] for k in ("instructions", "images", "train_config")))
    return 0


def _cmd_tokenizer_train(args) -> int:
    from .tokenizer import check_round_trip, train_tokenizer

    train_tokenizer(args.out, args.instructions, vocab_size=args.vocab_size)
    problems = check_round_trip(args.out)
    if problems:
        raise DataToolError(f"{args.out}: tokenizer fails its round-trip check: " + "; ".join(problems))
    with open(os.path.join(args.out, "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    print(f"wrote tokenizer to {args.out} (vocab {vocab}; media tokens are added by the loader)")
    return 0


def _cmd_inspect(args) -> int:
    from .inspect_data import inspect

    report, num_bad = inspect(args.dir, num=args.num, verify=args.verify, scan_shards=args.scan_shards,
                              html_path=args.html, png_path=args.png)
    print(report)
    for path in (args.html, args.png):
        if path:
            print(f"wrote {path}")
    return 1 if num_bad else 0


def _add_run_options(p: argparse.ArgumentParser, shards: bool = True) -> None:
    if shards:
        p.add_argument("--shard-mib", "--shard-max-mib", dest="shard_mib", type=float, default=256,
                       help="target shard size: a shard is closed once its members reach this many MiB")
        p.add_argument("--shard-samples", type=int, default=1000, help="a shard is closed once it holds this many samples")
        p.add_argument("--source", default=None, help="the records' 'source' field (default: the corpus name)")
    p.add_argument("--force", action="store_true", help="start over, ignoring any previous (complete or partial) run")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain-data", description="Build and inspect mmtrain datasets.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{convert,synth,tokenizer,inspect}")

    convert = verbs.add_parser("convert", help="convert a published corpus to mmtrain shards")
    corpora = convert.add_subparsers(dest="corpus", required=True, metavar="{mmc4,obelics,mimicit,pairs}")

    p = corpora.add_parser("mmc4", help="MMC4 documents (jsonl, jsonl.gz or zip) -> interleaved shards")
    p.add_argument("inputs", nargs="+", help="docs_shard_N_v3.jsonl[.gz|.zip]")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--images-dir", default=None, help="directory of the downloaded images, by image_name "
                   "(else images come from each image_info's image_base64)")
    p.add_argument("--assignment", choices=["matched", "hungarian"], default="matched",
                   help="image -> sentence: MMC4's matched_text_index, or a one-to-one assignment over "
                        "similarity_matrix (needs scipy)")
    p.add_argument("--sim-threshold", type=float, default=0.24,
                   help="drop images less similar to their sentence (raw CLIP cosine; OpenFlamingo 0.24, Otter 0.32)")
    p.add_argument("--min-image-bytes", type=int, default=10240, help="drop smaller images (0: keep all)")
    p.add_argument("--keep-text-only", action="store_true", help="keep documents left with no image")
    _add_run_options(p)
    p.set_defaults(func=_cmd_convert_mmc4)

    p = corpora.add_parser("obelics", help="OBELICS parquet -> interleaved shards")
    p.add_argument("inputs", nargs="+", help="OBELICS parquet files")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--image-store", default=None,
                   help="img2dataset output directory (files or webdataset tars) holding the images by URL")
    p.add_argument("--on-missing-image", choices=["drop-image", "drop-document"], default="drop-image",
                   help="what a missing image costs: itself (default) or its whole document")
    p.add_argument("--keep-text-only", action="store_true", help="keep documents left with no image")
    _add_run_options(p)
    p.set_defaults(func=_cmd_convert_obelics)

    p = corpora.add_parser("mimicit", help="MIMIC-IT (Otter) instructions + images [+ train config]")
    p.add_argument("--instructions", required=True, help="X_instructions.json")
    p.add_argument("--images", required=True, nargs="+", help="X.parquet (column base64, indexed by image id) or legacy X.json")
    p.add_argument("--train-config", default=None, help="X_train.json {ins_id: [in-context ins_ids]}; its keys are the episodes")
    p.add_argument("--in-context", choices=["train-config", "rel-ins", "none"], default=None,
                   help="where in-context examples come from (default: train-config if given, else none)")
    p.add_argument("--video", action="store_true", help="a video task: each instruction's image_ids are the frames "
                   "of one clip, written as the turn's 'frames'")
    p.add_argument("--out", required=True, help="output dataset directory")
    _add_run_options(p)
    p.set_defaults(func=_cmd_convert_mimicit)

    p = corpora.add_parser("pairs", help="img2dataset tars (jpg+txt), read as they are: write a manifest over them")
    p.add_argument("sources", nargs="+", help="tar files or directories holding *.tar")
    p.add_argument("--out", default=None, help="where the manifest goes (default: the tars' directory)")
    _add_run_options(p, shards=False)
    p.set_defaults(func=_cmd_convert_pairs)

    synth = verbs.add_parser("synth", help="write a synthetic dataset in a published raw layout")
    kinds = synth.add_subparsers(dest="dataset", required=True, metavar="{shapes}")
    p = kinds.add_parser("shapes", help="coloured-shape VQA in MIMIC-IT layout")
    p.add_argument("--out", required=True)
    p.add_argument("--num-episodes", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--image-size-px", type=int, default=64)
    p.add_argument("--context-fraction", type=float, default=0.5, help="fraction of episodes with 1-2 in-context examples")
    p.add_argument("--prefix", default="SHAPES", help="file and id prefix (SHAPES_instructions.json, SHAPES_INS_000000)")
    p.set_defaults(func=_cmd_synth_shapes)

    tok = verbs.add_parser("tokenizer", help="tokenizer tools")
    tok_verbs = tok.add_subparsers(dest="tok_verb", required=True, metavar="{train}")
    p = tok_verbs.add_parser("train", help="train a tiny byte-level BPE tokenizer on instruction files")
    p.add_argument("--out", required=True)
    p.add_argument("--instructions", required=True, nargs="+")
    p.add_argument("--vocab-size", type=int, default=512)
    p.set_defaults(func=_cmd_tokenizer_train)

    p = verbs.add_parser("inspect", help="a dataset's manifest and first samples (text, HTML, PNG)")
    p.add_argument("dir")
    p.add_argument("--num", type=int, default=3, help="samples to show")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    p.add_argument("--scan-shards", type=int, default=1, help="shards read to count records by source")
    p.add_argument("--html", default=None, help="write the samples as an HTML page (images inline)")
    p.add_argument("--png", default=None, help="write the samples as a PNG contact sheet")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mmtrain.data.formats import FormatError

    try:
        return args.func(args)
    except (DataToolError, FormatError) as e:
        print(f"mmtrain-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
