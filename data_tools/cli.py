"""`mmtrain-data`: build and look at mmtrain datasets.

    mmtrain-data convert mimicit --instructions X_instructions.json --images X.parquet \
        [--train-config X_train.json] [--in-context train-config|rel-ins|none] --out DIR [--shard-samples 1000]
    mmtrain-data synth shapes --out DIR --num-episodes N --seed S [--image-size-px 64] [--context-fraction 0.5]
    mmtrain-data tokenizer train --out DIR --instructions A_instructions.json [B ...] [--vocab-size 512]
    mmtrain-data inspect DIR [--num 3] [--verify]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from typing import List, Optional

from . import DataToolError


def _cmd_convert_mimicit(args) -> int:
    from .mimicit import convert_mimicit

    result = convert_mimicit(
        instructions_path=args.instructions,
        images_paths=args.images,
        out_dir=args.out,
        train_config_path=args.train_config,
        in_context=args.in_context,
        shard_samples=args.shard_samples,
        shard_max_mib=args.shard_max_mib,
        source=args.source,
        force=args.force,
    )
    print(result.summary())
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


def _image_desc(name: str, data: Optional[bytes]) -> str:
    if data is None:
        return f"<image {name}: MISSING>"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return f"<image {name} {im.format} {im.width}x{im.height}>"
    except Exception as e:  # a broken image is something to show, not a crash
        return f"<image {name}: undecodable ({type(e).__name__})>"


def _iter_samples(path: str):
    """(key, {ext: bytes}) groups of consecutive members sharing a key, as webdataset groups them."""
    key, members = None, {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _cmd_inspect(args) -> int:
    from mmtrain.data.formats import FormatError, read_manifest, sha256_file, validate_episode

    manifest = read_manifest(args.dir)
    shards = manifest["shards"]
    print(f"{args.dir}: {manifest['format']}, kind {manifest['kind']}, "
          f"{len(shards)} shards, {manifest.get('num_samples', sum(s['num_samples'] for s in shards))} samples")
    bad = 0
    for shard in shards:
        line = f"  {shard['name']}  {shard['num_samples']} samples  sha256 {shard['sha256'][:12]}"
        if args.verify:
            ok = sha256_file(os.path.join(args.dir, shard["name"])) == shard["sha256"]
            bad += not ok
            line += "  OK" if ok else "  CHECKSUM MISMATCH"
        print(line)
    info_path = os.path.join(args.dir, "convert_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            skipped = json.load(f).get("skipped", {})
        if skipped:
            print("  skipped at conversion: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    shown = 0
    for shard in shards:
        if shown >= args.num:
            break
        for key, members in _iter_samples(os.path.join(args.dir, shard["name"])):
            if shown >= args.num:
                break
            where = f"{shard['name']}:{key}"
            try:
                record = json.loads(members.get("json", b"null"))
                validate_episode(record, where)
            except (json.JSONDecodeError, FormatError) as e:
                print(f"--- {where}: invalid record ({e})")
                shown += 1
                continue
            n_images = sum(len(t.get("images", [])) for t in record["turns"])
            print(f"--- {where}  id={record.get('id')} source={record.get('source')} "
                  f"turns={len(record['turns'])} images={n_images}")
            for i, turn in enumerate(record["turns"]):
                role = "target" if i == len(record["turns"]) - 1 else "context"
                images = " ".join(_image_desc(n, members.get(n)) for n in turn.get("images", []))
                print(f"  [{i} {role}] {images} User: {turn['instruction']!r} GPT: {turn['answer']!r}")
            shown += 1
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain-data", description="Build and inspect mmtrain datasets.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{convert,synth,tokenizer,inspect}")

    convert = verbs.add_parser("convert", help="convert a published corpus to mmtrain shards")
    corpora = convert.add_subparsers(dest="corpus", required=True, metavar="{mimicit}")
    p = corpora.add_parser("mimicit", help="MIMIC-IT (Otter) instructions + images [+ train config]")
    p.add_argument("--instructions", required=True, help="X_instructions.json")
    p.add_argument("--images", required=True, nargs="+", help="X.parquet (column base64, indexed by image id) or legacy X.json")
    p.add_argument("--train-config", default=None, help="X_train.json {ins_id: [in-context ins_ids]}; its keys are the episodes")
    p.add_argument("--in-context", choices=["train-config", "rel-ins", "none"], default=None,
                   help="where in-context examples come from (default: train-config if given, else none)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--shard-samples", type=int, default=1000, help="max episodes per shard")
    p.add_argument("--shard-max-mib", type=int, default=256, help="max image+record MiB per shard")
    p.add_argument("--source", default=None, help="record 'source' field (default: the file prefix, lowercased)")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is complete and up to date")
    p.set_defaults(func=_cmd_convert_mimicit)

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

    p = verbs.add_parser("inspect", help="print a dataset's manifest and first samples")
    p.add_argument("dir")
    p.add_argument("--num", type=int, default=3, help="samples to print")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
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
