"""`mmtrain submit slurm RECIPE --nodes N --gpus-per-node G [--partition P] [--dry-run] [key=value ...]`.

Checks the recipe for the job's world size, renders the batch script into the run directory
(`<run_dir>/slurm.sbatch`, logs at `<run_dir>/slurm-<jobid>.out`) and submits it with sbatch.

One source of truth for the script: `mmtrain.sbatch` next to this module (package data, so an
installed mmtrain has it; launch/slurm/mmtrain.sbatch is a link to it for use by hand). Rendering
keeps its body as it is and changes only its #SBATCH header (options given here replace or join the
template's) and the block between the settings markers (literal values instead of the by-hand
defaults), so what runs by hand and what is submitted are the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Sequence

from mmtrain.config import ConfigError, derive_batch, load_config, normalize_overrides
from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmtrain.sbatch")
SCRIPT_NAME = "slurm.sbatch"
LOG_PATTERN = "slurm-%j.out"
SETTINGS_BEGIN = "# mmtrain-settings-begin"
SETTINGS_END = "# mmtrain-settings-end"
SBATCH_PREFIX = "#SBATCH "


class TemplateError(RuntimeError):
    """The batch-script template lacks a part that rendering relies on."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "slurm", help="render the recipe's sbatch script into its run directory and submit it",
        description="Extra key=value arguments are recipe overrides. The job runs with resume=auto and requeues "
                    f"itself when its ranks exit {PREEMPTED_EXIT_CODE} after saving (SIGUSR1 before the time limit, "
                    "or `scancel --signal=USR1 JOBID`).")
    p.add_argument("recipe")
    p.add_argument("--nodes", type=_positive_int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=_non_negative_int, required=True,
                   help="GPUs (and ranks) per node; 0: CPU ranks, as many as --cpu-ranks-per-node")
    p.add_argument("--cpu-ranks-per-node", type=_positive_int, default=None,
                   help="ranks per node when --gpus-per-node is 0 (default 1)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    p.add_argument("--time", help="time limit, as sbatch takes it (e.g. 2-00:00:00)")
    p.add_argument("--signal-lead-s", type=_positive_int, default=None,
                   help="seconds before the time limit at which the ranks get SIGUSR1 (default: the template's)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option for the header, e.g. --sbatch-arg=--account=proj (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script and the sbatch command only")
    p.set_defaults(func=_cmd)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def read_template(path: str = TEMPLATE_PATH) -> str:
    with open(path) as f:
        return f.read()


def _option_key(option: str) -> str:
    return option.split("=", 1)[0]


def render(template: str, sbatch_options: Sequence[str], settings: Dict[str, str], template_name: str = "template"
           ) -> str:
    """The template with its #SBATCH header merged with `sbatch_options` (same option: the given value
    wins, in the template's place; new options follow the template's) and its settings block replaced
    by `settings` (name → literal bash value, already quoted)."""
    lines = template.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith(SBATCH_PREFIX)]
    if not header or header != list(range(header[0], header[-1] + 1)):
        raise TemplateError(f"{template_name}: the #SBATCH lines must form one block")
    try:
        begin, end = lines.index(SETTINGS_BEGIN), lines.index(SETTINGS_END)
    except ValueError:
        raise TemplateError(f"{template_name}: missing '{SETTINGS_BEGIN}' or '{SETTINGS_END}' line") from None
    if not header[-1] < begin < end:
        raise TemplateError(f"{template_name}: the settings block must follow the #SBATCH header")
    merged: Dict[str, str] = {}
    for i in header:
        option = lines[i][len(SBATCH_PREFIX):].strip()
        merged[_option_key(option)] = option
    for option in sbatch_options:
        merged[_option_key(option)] = option
    out = lines[: header[0]] + [SBATCH_PREFIX + o for o in merged.values()]
    out += lines[header[-1] + 1 : begin + 1] + [f"{name}={value}" for name, value in settings.items()]
    return "\n".join(out + lines[end:]) + "\n"


def _check_resume(overrides: List[str]) -> None:
    for override in overrides:
        key, value = override.split("=", 1)
        if key == "resume" and value != "auto":
            raise ConfigError("resume", f"a Slurm job always runs with resume=auto (it continues after a requeue "
                                        f"from its newest checkpoint); drop the override resume={value}")


def job_script(args, overrides: Sequence[str]) -> Dict[str, str]:
    """Check the recipe for the job's world size and render its script; returns run_dir, script path, text."""
    overrides = normalize_overrides(overrides)
    _check_resume(overrides)
    recipe = os.path.abspath(args.recipe)
    cfg, warnings = load_config(recipe, [*overrides, "resume=auto"])
    for w in warnings:
        print(f"mmtrain: warning: {w}", file=sys.stderr)
    if args.gpus_per_node and args.cpu_ranks_per_node is not None:
        print(f"mmtrain: warning: --cpu-ranks-per-node has no effect with --gpus-per-node {args.gpus_per_node} "
              "(one rank per GPU)", file=sys.stderr)
    ranks_per_node = args.gpus_per_node or args.cpu_ranks_per_node or 1
    derive_batch(cfg, args.nodes * ranks_per_node)
    run_dir = os.path.abspath(os.path.join(cfg.output_dir, cfg.run_name))
    options = [
        f"--job-name={cfg.run_name}",
        f"--nodes={args.nodes}",
        f"--output={os.path.join(run_dir, LOG_PATTERN)}",
        # Relative paths in the recipe and overrides resolve where `mmtrain submit` ran.
        f"--chdir={os.getcwd()}",
    ]
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.partition:
        options.append(f"--partition={args.partition}")
    if args.time:
        options.append(f"--time={args.time}")
    if args.signal_lead_s:
        options.append(f"--signal=USR1@{args.signal_lead_s}")
    for option in args.sbatch_arg:
        if not option.startswith("--"):
            raise SystemExit(f"mmtrain submit slurm: --sbatch-arg {option!r} is not a long sbatch option "
                             "(write --sbatch-arg=--name=value)")
        options.append(option)
    settings = {
        "PYTHON": shlex.quote(sys.executable),
        "RANKS_PER_NODE": str(ranks_per_node),
        "PREEMPTED_EXIT_CODE": str(PREEMPTED_EXIT_CODE),
        "MMTRAIN_ARGS": "(" + " ".join(shlex.quote(a) for a in [recipe, *overrides]) + ")",
    }
    text = render(read_template(), options, settings, TEMPLATE_PATH)
    return {"run_dir": run_dir, "script": os.path.join(run_dir, SCRIPT_NAME), "text": text}


def submit(script: str) -> str:
    """sbatch the script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise SystemExit("mmtrain submit slurm: sbatch is not on PATH (run on a Slurm login node, or use --dry-run)")
    done = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mmtrain submit slurm: sbatch {script} failed (exit {done.returncode}): "
                         f"{done.stderr.strip() or done.stdout.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return done.stdout.strip().split(";")[0]


def _cmd(args, overrides) -> int:
    job = job_script(args, overrides)
    os.makedirs(job["run_dir"], exist_ok=True)
    with open(job["script"], "w") as f:
        f.write(job["text"])
    os.chmod(job["script"], 0o755)
    command = f"sbatch {shlex.quote(job['script'])}"
    if args.dry_run:
        print(job["text"], end="")
        print(f"# not submitted (--dry-run); to submit: {command}")
        return 0
    job_id = submit(job["script"])
    print(json.dumps({"job_id": job_id, "script": job["script"], "run_dir": job["run_dir"],
                      "log": os.path.join(job["run_dir"], LOG_PATTERN.replace("%j", job_id))}))
    return 0
