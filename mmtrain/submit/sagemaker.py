"""`mmtrain submit sagemaker RECIPE --instance-type T --instance-count N [--dry-run] [k=v ...]`,
and the container side of the job (launch/sagemaker/entry.py calls :func:`container_main`).

Submit side: a `sagemaker.pytorch.PyTorch` estimator (SageMaker Python SDK v2) whose code is
launch/sagemaker/ (entry.py, requirements.txt) plus the `mmtrain` package and the recipe file.
GPU instances use SageMaker's torch_distributed, which starts torchrun with entry.py on every host;
other instances start entry.py once per host and entry.py becomes the launcher. `--dry-run` runs
the SDK against a boto session whose every API call is answered locally, and prints the requests
the SDK made (the CreateTrainingJob body exactly as it would go on the wire, and what would be
uploaded): no network, no AWS credentials.

Container side: SageMaker's environment becomes recipe overrides:
    output_dir      → /opt/ml/checkpoints (SageMaker syncs it to checkpoint_s3_uri while the job runs
                      and restores it into a restarted job; resume=auto continues from it)
    tensorboard_dir → /opt/ml/output/tensorboard (uploaded to the TensorBoard S3 path)
    data.sources[i].path → SM_CHANNEL_<SOURCE NAME>; channel `eval` → data.eval_path,
                      `tokenizer` → model.tokenizer, `weights` → model.init_from
then the user's hyperparameters (key=value overrides) on top. After training, global rank 0
exports the model to SM_MODEL_DIR (`mmtrain export`) and copies the run's logs to SM_OUTPUT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mmtrain.config import ConfigError, load_config, normalize_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_DIR = os.path.join(REPO, "launch", "sagemaker")
PACKAGE_DIR = os.path.join(REPO, "mmtrain")

# Paths inside the training container. SageMaker gives no SM_* variable for the checkpoint and
# TensorBoard directories, so they hang off one root that tests point at a temporary directory.
SM_ROOT_ENV = "MMTRAIN_SM_ROOT"
DEFAULT_SM_ROOT = "/opt/ml"
CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = os.path.join("output", "tensorboard")
# Channels with a meaning besides the recipe's data sources (which are matched by name).
# `weights` suits a directory of HF safetensors (IDEFICS, Fuyu); a list of sources (OpenFlamingo)
# takes a model.init_from=[...] hyperparameter with paths under /opt/ml/input/data/weights/.
SPECIAL_CHANNELS = {"eval": "data.eval_path", "tokenizer": "model.tokenizer", "weights": "model.init_from"}
# Hyperparameters that are not recipe overrides.
RECIPE_HP = "recipe"
NPROC_HP = "nproc_per_host"
# Run-directory files copied to SM_OUTPUT_DATA_DIR (SageMaker packs it into output.tar.gz).
RUN_LOG_FILES = ("config.yaml", "ds_config.json", "metrics.jsonl", "eval.jsonl", "train.log")

DEFAULT_FRAMEWORK_VERSION = "2.8.0"
DEFAULT_PY_VERSION = "py312"
DRY_RUN_REGION = "us-east-1"
DRY_RUN_ROLE = "arn:aws:iam::000000000000:role/mmtrain-dry-run"
DRY_RUN_S3_PREFIX = "s3://mmtrain-dry-run/mmtrain"


# ---------------------------------------------------------------------------------- container side
def sm_root(env: Mapping[str, str]) -> str:
    return env.get(SM_ROOT_ENV, DEFAULT_SM_ROOT)


def read_channels(env: Mapping[str, str]) -> Dict[str, str]:
    """Channel name → local directory, from SM_CHANNELS (the names as given) and SM_CHANNEL_<NAME>."""
    if "SM_CHANNELS" in env:
        names = json.loads(env["SM_CHANNELS"])
    else:
        names = [k[len("SM_CHANNEL_"):].lower() for k in env if k.startswith("SM_CHANNEL_")]
    channels = {}
    for name in names:
        var = f"SM_CHANNEL_{name.upper()}"
        if var not in env:
            raise ConfigError(f"channel {name}", f"SM_CHANNELS names it but {var} is not set")
        channels[name] = env[var]
    return channels


def read_hyperparameters(argv: Sequence[str], env: Mapping[str, str]) -> Dict[str, str]:
    """The user's hyperparameters: SM_HPS (JSON), then `--key value` / `--key=value` arguments
    (SageMaker passes both; a run by hand may pass only arguments). SDK-internal `sagemaker_*`
    keys are dropped."""
    hps: Dict[str, Any] = dict(json.loads(env.get("SM_HPS", "{}")))
    for item in normalize_overrides(list(argv)):
        key, value = item.split("=", 1)
        hps[key] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in hps.items() if not k.startswith("sagemaker_")}


def resolve_recipe(recipe: str, code_dir: str) -> str:
    """A relative recipe path is looked up next to entry.py (where the submitter puts it) first."""
    if os.path.isabs(recipe):
        return recipe
    beside = os.path.join(code_dir, recipe)
    return beside if os.path.exists(beside) else os.path.abspath(recipe)


def container_overrides(source_names: Sequence[str], channels: Mapping[str, str], root: str) -> List[str]:
    """Recipe overrides that put a run's inputs and outputs where SageMaker expects them."""
    overrides = [
        f"output_dir={os.path.join(root, CHECKPOINT_SUBDIR)}",
        f"tensorboard_dir={os.path.join(root, TENSORBOARD_SUBDIR)}",
        "resume=auto",
    ]
    for name, path in channels.items():
        if name in SPECIAL_CHANNELS:
            overrides.append(f"{SPECIAL_CHANNELS[name]}={path}")
        elif name in source_names:
            overrides.append(f"data.sources[{list(source_names).index(name)}].path={path}")
        else:
            raise ConfigError(
                f"channel {name}",
                f"matches no data source of the recipe ({', '.join(source_names)}) and is not one of "
                f"{', '.join(SPECIAL_CHANNELS)}; name channels after data.sources[].name",
            )
    return overrides


def _is_under(path: str, parent: str) -> bool:
    path, parent = os.path.abspath(path), os.path.abspath(parent)
    return path == parent or path.startswith(parent + os.sep)


def plan_container_run(argv: Sequence[str], env: Mapping[str, str], code_dir: str) -> Dict[str, Any]:
    """Everything a container run needs, checked before any rank starts."""
    hps = read_hyperparameters(argv, env)
    if RECIPE_HP not in hps:
        raise ConfigError(f"hyperparameter {RECIPE_HP}", "missing: the job must name its recipe file")
    recipe = resolve_recipe(hps.pop(RECIPE_HP), code_dir)
    nproc = hps.pop(NPROC_HP, None)
    user_overrides = [f"{k}={v}" for k, v in hps.items()]
    cfg, _ = load_config(recipe, user_overrides)
    root = sm_root(env)
    overrides = container_overrides([s.name for s in cfg.data.sources], read_channels(env), root) + user_overrides
    cfg, _ = load_config(recipe, overrides)
    hosts = json.loads(env.get("SM_HOSTS", '["algo-1"]'))
    current_host = env.get("SM_CURRENT_HOST", hosts[0])
    if current_host not in hosts:
        raise ConfigError("SM_CURRENT_HOST", f"{current_host!r} is not in SM_HOSTS {hosts}")
    if len(hosts) > 1 and _is_under(cfg.output_dir, os.path.join(root, CHECKPOINT_SUBDIR)):
        # Every rank writes its ZeRO shards into one checkpoint directory that rank 0 then
        # completes; /opt/ml/checkpoints is each instance's own disk, so that needs shared storage.
        raise ConfigError(
            "output_dir",
            f"{len(hosts)} hosts cannot share {cfg.output_dir}, a directory local to each instance; pass "
            "output_dir=<a directory on FSx for Lustre or EFS that every host mounts> as a hyperparameter",
        )
    if "SM_MODEL_DIR" not in env:
        raise ConfigError("SM_MODEL_DIR", "not set: entry.py runs inside a SageMaker training container")
    num_gpus = int(env.get("SM_NUM_GPUS", "0"))
    return {
        "recipe": recipe,
        "overrides": overrides,
        "run_dir": os.path.join(cfg.output_dir, cfg.run_name),
        "hosts": hosts,
        "node_rank": hosts.index(current_host),
        "nproc_per_host": int(nproc) if nproc is not None else max(1, num_gpus),
        "model_dir": env["SM_MODEL_DIR"],
        "output_data_dir": env.get("SM_OUTPUT_DATA_DIR"),
    }


def _launch_ranks(plan: Dict[str, Any], entry_script: str, argv: Sequence[str]) -> int:
    """entry.py started once on this host: start its ranks with torchrun (what SageMaker's
    torch_distributed does on GPU instances), each of which runs entry.py again as one rank."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={plan['nproc_per_host']}"]
    if len(plan["hosts"]) == 1:
        torchrun.append("--standalone")
    else:
        torchrun += [f"--nnodes={len(plan['hosts'])}", f"--node_rank={plan['node_rank']}",
                     f"--master_addr={plan['hosts'][0]}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    print(f"mmtrain: starting {plan['nproc_per_host']} rank(s) on host {plan['node_rank']} of {len(plan['hosts'])}",
          flush=True)
    return subprocess.call([*torchrun, entry_script, *argv])


def _finish_on_rank0(plan: Dict[str, Any]) -> None:
    from mmtrain.cli import main as cli_main

    if plan["output_data_dir"]:
        os.makedirs(plan["output_data_dir"], exist_ok=True)
        for name in RUN_LOG_FILES:
            path = os.path.join(plan["run_dir"], name)
            if os.path.exists(path):
                shutil.copy2(path, plan["output_data_dir"])
    rc = cli_main(["export", plan["run_dir"], "--out", plan["model_dir"]])
    if rc:
        raise RuntimeError(f"mmtrain export {plan['run_dir']} --out {plan['model_dir']} failed with code {rc}")


def container_main(argv: Sequence[str], entry_script: str, env: Optional[Mapping[str, str]] = None) -> int:
    """Run one SageMaker job step on this host: as one rank when a launcher started us (RANK is
    set), else as the launcher of this host's ranks."""
    env = os.environ if env is None else env
    try:
        plan = plan_container_run(argv, env, os.path.dirname(os.path.abspath(entry_script)))
    except ConfigError as e:
        print(f"mmtrain: sagemaker: config error: {e}", file=sys.stderr)
        return 2
    if "RANK" not in env:
        return _launch_ranks(plan, entry_script, argv)
    from mmtrain.train import main as train_main

    rc = train_main([plan["recipe"], *plan["overrides"]])
    if rc == 0 and int(env["RANK"]) == 0:
        _finish_on_rank0(plan)
    return rc


# ------------------------------------------------------------------------------------ submit side
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sagemaker", help="submit a recipe as a SageMaker training job (--dry-run prints the request)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--instance-type", required=True, help="e.g. ml.p5.48xlarge, ml.g5.12xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--channel", action="append", default=[], metavar="NAME=S3_URI",
                   help="input channel; NAME is a data source's name, or eval, tokenizer, weights (repeatable)")
    p.add_argument("--s3-prefix", default=None,
                   help="s3://bucket/prefix for code, checkpoints, TensorBoard events and the model")
    p.add_argument("--role", default=os.environ.get("SAGEMAKER_ROLE"), help="IAM role ARN (default $SAGEMAKER_ROLE)")
    p.add_argument("--region", default=None, help="default: the AWS configuration's region")
    p.add_argument("--job-name", default=None, help="default: the recipe's run_name and a timestamp")
    p.add_argument("--framework-version", default=DEFAULT_FRAMEWORK_VERSION, help="PyTorch DLC version")
    p.add_argument("--py-version", default=DEFAULT_PY_VERSION)
    p.add_argument("--image-uri", default=None, help="own container instead of the PyTorch DLC")
    p.add_argument("--nproc-per-host", type=int, default=None, help="ranks per host (default: its GPUs, or 1)")
    p.add_argument("--volume-size-gib", type=int, default=200)
    p.add_argument("--max-run-s", type=int, default=5 * 24 * 3600)
    p.add_argument("--spot", action="store_true", help="managed spot; interrupted jobs resume from checkpoints")
    p.add_argument("--max-wait-s", type=int, default=None, help="with --spot: run time plus waiting (default 2 x max-run)")
    p.add_argument("--dry-run", action="store_true", help="print the SDK's requests; send nothing")
    p.set_defaults(func=_cmd)


def parse_channels(items: Sequence[str]) -> Dict[str, str]:
    channels: Dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not uri.startswith(("s3://", "file://")):
            raise ConfigError(f"--channel {item}", "expected NAME=s3://bucket/prefix (NAME: letters, digits, . _ -)")
        if name in channels:
            raise ConfigError(f"--channel {name}", "given twice")
        channels[name] = uri
    return channels


def _job_base_name(run_name: str) -> str:
    """SageMaker job names: letters, digits and hyphens; the SDK appends a 24-character timestamp."""
    return (re.sub(r"[^A-Za-z0-9-]+", "-", run_name).strip("-") or "mmtrain")[:38]


def _uses_gpus(instance_type: str) -> bool:
    # ml.p* and ml.g* are the GPU families; SageMaker's torch_distributed accepts only those here.
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
    return family[:1] in ("p", "g")


def build_estimator(args, overrides: Sequence[str], session) -> Tuple[Any, Dict[str, Any]]:
    """The estimator and the inputs for `fit`, after checking the recipe and channels here."""
    from sagemaker.debugger import TensorBoardOutputConfig
    from sagemaker.inputs import TrainingInput
    from sagemaker.pytorch import PyTorch

    overrides = normalize_overrides(list(overrides))
    cfg, warnings = load_config(args.recipe, overrides)
    for w in warnings:
        print(f"mmtrain: warning: {w}", file=sys.stderr)
    channels = parse_channels(args.channel)
    source_names = [s.name for s in cfg.data.sources]
    container_overrides(source_names, {name: "" for name in channels}, DEFAULT_SM_ROOT)  # names check
    for name in source_names:
        if name not in channels:
            print(f"mmtrain: warning: data source {name!r} has no --channel; its path "
                  f"{cfg.data.sources[source_names.index(name)].path} must exist inside the container", file=sys.stderr)
    if args.instance_count < 1:
        raise ConfigError("--instance-count", f"must be at least 1, got {args.instance_count}")
    if args.instance_count > 1 and not any(o.startswith("output_dir=") for o in overrides):
        raise ConfigError(
            "--instance-count",
            f"{args.instance_count} hosts need output_dir=<a directory on shared storage (FSx for Lustre, EFS)> "
            "as an override: /opt/ml/checkpoints is local to each instance and a checkpoint is one directory "
            "that every rank writes into",
        )
    prefix = (args.s3_prefix or "").rstrip("/")
    if not prefix.startswith("s3://"):
        raise ConfigError("--s3-prefix", f"needs s3://bucket/prefix, got {args.s3_prefix!r}")
    run = _job_base_name(cfg.run_name)
    hyperparameters = {RECIPE_HP: os.path.basename(args.recipe)}
    hyperparameters.update(o.split("=", 1) for o in overrides)
    if args.nproc_per_host is not None:
        hyperparameters[NPROC_HP] = str(args.nproc_per_host)
    estimator = PyTorch(
        entry_point="entry.py",
        source_dir=LAUNCH_DIR,
        dependencies=[PACKAGE_DIR, os.path.abspath(args.recipe)],
        role=args.role,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        framework_version=None if args.image_uri else args.framework_version,
        py_version=None if args.image_uri else args.py_version,
        image_uri=args.image_uri,
        distribution={"torch_distributed": {"enabled": True}} if _uses_gpus(args.instance_type) else None,
        hyperparameters=hyperparameters,
        # Keyed by run name, so a resubmitted job of the same recipe continues (resume=auto).
        checkpoint_s3_uri=f"{prefix}/checkpoints/{run}",
        checkpoint_local_path=f"{DEFAULT_SM_ROOT}/{CHECKPOINT_SUBDIR}",
        tensorboard_output_config=TensorBoardOutputConfig(
            s3_output_path=f"{prefix}/tensorboard/{run}",
            container_local_output_path=f"{DEFAULT_SM_ROOT}/{TENSORBOARD_SUBDIR}"),
        output_path=f"{prefix}/output",
        code_location=f"{prefix}/code",
        base_job_name=run,
        volume_size=args.volume_size_gib,
        max_run=args.max_run_s,
        use_spot_instances=args.spot,
        max_wait=(args.max_wait_s or 2 * args.max_run_s) if args.spot else None,
        disable_profiler=True,
        sagemaker_session=session,
    )
    inputs = {name: TrainingInput(uri) for name, uri in channels.items()}
    return estimator, inputs


class DryRunRecorder:
    """botocore `before-call` handler: records each API request the SDK makes and answers it
    locally, so nothing is signed or sent."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, model, params, **_kwargs):
        from botocore.awsrequest import AWSResponse

        call: Dict[str, Any] = {"operation": model.name, "service": model.service_model.service_name}
        body = params.get("body")
        if hasattr(body, "read"):
            body = body.read()
        if model.name == "PutObject":
            call["url"] = params.get("url")
            call["bytes"] = len(body or b"")
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                    call["top_level"] = sorted({m.name.split("/")[0] for m in tar.getmembers()})
            except tarfile.TarError:
                pass
        elif body:
            call["request"] = json.loads(body)
        self.calls.append(call)
        parsed = {"TrainingJobArn": "arn:aws:sagemaker:dry-run"} if model.name == "CreateTrainingJob" else {}
        return AWSResponse(params.get("url", ""), 200, {}, None), parsed


def dry_run_session(region: str, recorder: DryRunRecorder):
    import boto3
    import sagemaker

    # Static placeholder keys: botocore never signs a request that a before-call handler answers,
    # and the placeholders keep it from searching the machine for real credentials.
    boto_session = boto3.Session(region_name=region, aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
    boto_session.events.register("before-call", recorder)
    # The SDK's telemetry goes over plain HTTPS, past boto; opt out on top of the user's SDK config.
    config = sagemaker.config.load_sagemaker_config() or {"SchemaVersion": "1.0"}
    modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    modules["TelemetryOptOut"] = True
    return sagemaker.Session(boto_session=boto_session, sagemaker_config=config)


def _cmd(args, overrides: List[str]) -> int:
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    if args.dry_run:
        # Importing the SDK builds a default boto session whose credential search ends at the EC2
        # metadata endpoint (a network call); a dry run needs no credentials at all.
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        import sagemaker  # noqa: F401
    except ImportError as e:
        raise SystemExit("mmtrain submit sagemaker needs the SageMaker SDK: pip install 'mmtrain[sagemaker]'") from e
    if args.dry_run:
        args.role = args.role or DRY_RUN_ROLE
        args.s3_prefix = args.s3_prefix or DRY_RUN_S3_PREFIX
        recorder = DryRunRecorder()
        session = dry_run_session(args.region or DRY_RUN_REGION, recorder)
    else:
        if not args.role:
            raise ConfigError("--role", "an IAM role ARN that SageMaker assumes is needed (or set $SAGEMAKER_ROLE)")
        import boto3
        import sagemaker

        session = sagemaker.Session(boto_session=boto3.Session(region_name=args.region))
    estimator, inputs = build_estimator(args, overrides, session)
    estimator.fit(inputs=inputs or None, job_name=args.job_name, wait=False, logs=False)
    if args.dry_run:
        print(json.dumps({"dry_run": True, "calls": recorder.calls}, indent=1, default=str))
    else:
        job = estimator.latest_training_job.name
        print(json.dumps({"job_name": job, "region": session.boto_region_name,
                          "checkpoints": estimator.checkpoint_s3_uri, "model": f"{estimator.output_path}/{job}"}))
    return 0
