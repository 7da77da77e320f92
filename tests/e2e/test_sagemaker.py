"""SageMaker: `mmtrain submit sagemaker --dry-run` prints the SDK's own CreateTrainingJob request
with no network; launch/sagemaker/entry.py runs end to end on CPU under a simulated SageMaker
environment (the SM_* variables and the /opt/ml tree under a temporary root: one host, two CPU
ranks, channels holding the tiny shards and tokenizer)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import REPO, TINY_RECIPE

from mmtrain.config import ConfigError
from mmtrain.submit import sagemaker as sm

CHANNELS = ["--channel", "shapes=s3://bucket/shards/shapes", "--channel", "tokenizer=s3://bucket/tok"]


@pytest.fixture
def no_network(monkeypatch):
    """Records (and refuses) every attempt to resolve a host or open a connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


def _dry_run(capsys, *args):
    from mmtrain.cli import main

    assert main(["submit", "sagemaker", TINY_RECIPE, "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_dry_run_prints_the_sdk_request_without_network(capsys, no_network, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    result = _dry_run(capsys, "--instance-type", "ml.g5.12xlarge", "--instance-count", "1", *CHANNELS,
                      "--s3-prefix", "s3://bucket/mm", "--spot", "train.max_steps=100", "--optim.lr", "1e-3")
    assert no_network == []
    calls = {c["operation"]: c for c in result["calls"]}
    assert set(calls) == {"PutObject", "CreateTrainingJob"}
    # What would be uploaded is the code SageMaker unpacks into /opt/ml/code.
    assert calls["PutObject"]["top_level"] == ["entry.py", "mmtrain", "otter_shapes.yaml", "requirements.txt"]
    request = calls["CreateTrainingJob"]["request"]
    hps = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    assert hps["recipe"] == "otter_shapes.yaml" and hps["sagemaker_program"] == "entry.py"
    assert hps["train.max_steps"] == "100" and hps["optim.lr"] == "1e-3"
    assert hps["sagemaker_torch_distributed_enabled"] is True
    assert re.search(r"/pytorch-training:2\.8\.0-gpu-py312$", request["AlgorithmSpecification"]["TrainingImage"])
    assert request["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    assert request["ResourceConfig"]["InstanceCount"] == 1
    assert request["CheckpointConfig"] == {"S3Uri": "s3://bucket/mm/checkpoints/otter-shapes",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["TensorBoardOutputConfig"]["LocalPath"] == "/opt/ml/output/tensorboard"
    assert {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]} == {
        "shapes": "s3://bucket/shards/shapes", "tokenizer": "s3://bucket/tok"}
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"]["MaxRuntimeInSeconds"]


def test_dry_run_on_cpu_instances_lets_entry_start_the_ranks(capsys, no_network):
    result = _dry_run(capsys, "--instance-type", "ml.c5.4xlarge", *CHANNELS, "--nproc-per-host", "2")
    request = result["calls"][-1]["request"]
    hps = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    assert "sagemaker_torch_distributed_enabled" not in hps and hps["nproc_per_host"] == "2"
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("-cpu-py312")


@pytest.mark.parametrize("args, key", [
    (["--instance-count", "2"], "--instance-count"),  # /opt/ml/checkpoints is not shared between hosts
    (["--channel", "laion=s3://b/laion"], "channel laion"),  # no such data source
    (["--channel", "shapes"], "--channel shapes"),
])
def test_submit_errors_name_the_argument(capsys, no_network, args, key):
    from mmtrain.cli import main

    assert main(["submit", "sagemaker", TINY_RECIPE, "--dry-run", "--instance-type", "ml.p5.48xlarge", *args]) == 2
    assert f"config error: {key}:" in capsys.readouterr().err
    assert no_network == []


def test_container_requirements_follow_setup_py():
    """requirements.txt is what the container installs: setup.py's dependencies minus torch and
    torchvision (the container's CUDA build stays)."""
    import importlib.metadata

    wanted = {r.replace(" ", "") for r in importlib.metadata.requires("mmtrain") if ";" not in r}
    wanted -= {r for r in wanted if re.match(r"torch(vision)?\b", r)}
    with open(os.path.join(REPO, "launch", "sagemaker", "requirements.txt")) as f:
        listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}

    def normal(req):  # pip writes `transformers<6,>=5.0` for setup.py's `transformers>=5.0,<6`
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", req).groups()
        return name.lower(), tuple(sorted(spec.split(","))) if spec else ()

    assert {normal(r) for r in listed} == {normal(r) for r in wanted}


def test_multi_host_needs_shared_output_dir(tmp_path):
    env = {"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_MODEL_DIR": str(tmp_path / "m"),
           sm.SM_ROOT_ENV: str(tmp_path), "SM_HPS": json.dumps({"recipe": TINY_RECIPE})}
    with pytest.raises(ConfigError, match="^output_dir: 2 hosts"):
        sm.plan_container_run([], env, str(tmp_path))
    shared = str(tmp_path / "fsx" / "runs")
    plan = sm.plan_container_run(["--output_dir", shared], env, str(tmp_path))
    assert plan["node_rank"] == 1 and plan["run_dir"] == os.path.join(shared, "otter_shapes")


def _simulated_sagemaker(shapes_data, root):
    """The container's filesystem and environment for one host with two CPU ranks."""
    code = os.path.join(root, "code")
    shutil.copytree(os.path.join(REPO, "launch", "sagemaker"), code)
    shutil.copytree(os.path.join(REPO, "mmtrain"), os.path.join(code, "mmtrain"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TINY_RECIPE, code)
    channels = {"shapes": shapes_data["train"], "tokenizer": shapes_data["tokenizer"], "eval": shapes_data["eval"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    for name, src in channels.items():
        dst = os.path.join(root, "input", "data", name)
        shutil.copytree(src, dst)
        env[f"SM_CHANNEL_{name.upper()}"] = dst
    hps = {"recipe": "otter_shapes.yaml", "nproc_per_host": "2", "train.max_steps": "2",
           "train.micro_batch_size": "2", "train.global_batch_size": "4", "optim.warmup_steps": "1",
           "checkpoint.every_steps": "0", "eval.max_samples": "4"}
    env.update({
        sm.SM_ROOT_ENV: root,
        "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0", "SM_NUM_CPUS": "2",
        "SM_CHANNELS": json.dumps(sorted(channels)), "SM_HPS": json.dumps(hps),
        "SM_MODEL_DIR": os.path.join(root, "model"), "SM_OUTPUT_DATA_DIR": os.path.join(root, "output", "data"),
        "OMP_NUM_THREADS": "1",
    })
    # SageMaker passes the hyperparameters as sorted `--key value` arguments as well.
    argv = [a for key in sorted(hps) for a in (f"--{key}", hps[key])]
    return code, env, argv


@pytest.mark.dist
def test_entry_point_end_to_end_under_simulated_sagemaker(shapes_data, tmp_path):
    root = str(tmp_path / "opt_ml")
    code, env, argv = _simulated_sagemaker(shapes_data, root)
    done = subprocess.run([sys.executable, os.path.join(code, "entry.py"), *argv], capture_output=True, text=True,
                          cwd=code, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = os.path.join(root, "checkpoints", "otter_shapes")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "world 2 |" in f.read()
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step_0000002", "COMPLETE"))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        resolved = f.read()
    assert os.path.join(root, "input", "data", "shapes") in resolved and "resume: auto" in resolved
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["num_samples"] == 4  # the eval channel was used
    events = os.listdir(os.path.join(root, "output", "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert not os.path.exists(os.path.join(run_dir, "tb"))
    model_dir = os.path.join(root, "model")
    with open(os.path.join(model_dir, "export.json")) as f:
        exported = json.load(f)
    assert exported["files"] and all(os.path.exists(os.path.join(model_dir, name)) for name in exported["files"])
    assert {"metrics.jsonl", "train.log", "config.yaml"} <= set(os.listdir(os.path.join(root, "output", "data")))
