"""Recipe loading, overrides, errors that name the key, derived batch sizes, DeepSpeed JSON."""

import glob
import json
import os
import subprocess
import sys

import pytest

from mmtrain.config import ConfigError, deepspeed_json, derive_batch, load_config, normalize_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "recipes", "tiny", "otter_shapes.yaml")
RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(r, REPO) for r in RECIPES])
def test_every_recipe_loads_and_names_registered_parts(recipe):
    from mmtrain.data.formats import KINDS
    from mmtrain.engine.optim import check_model_section
    from mmtrain.models.registry import get_spec

    cfg, _ = load_config(recipe)
    spec = get_spec(cfg.model.name)  # raises for an unregistered flavour
    groups, trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
    assert trainable and set(trainable) <= set(spec.param_groups) == set(groups), trainable
    for source in cfg.data.sources:
        assert source.kind in KINDS
    ds = deepspeed_json(cfg, world_size=8 if cfg.train.global_batch_size is None else 1)
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * (8 if cfg.train.global_batch_size is None else 1)
    )
    with open(recipe) as f:
        header = f.read().split("\n", 1)[0]
    assert header.startswith("#"), "every recipe opens with comments giving its launch commands"


def test_recipes_exist():
    assert TINY in RECIPES


def test_overrides_forms_and_launcher_argument():
    assert normalize_overrides(["--local_rank=3", "a.b=1", "--c.d", "2", "--e=3", "--local_rank", "1"]) == [
        "a.b=1",
        "c.d=2",
        "e=3",
    ]
    cfg, _ = load_config(TINY, ["--local_rank=0", "optim.lr=1e-3", "--train.max_steps", "123", "data.sources[0].path=/x"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 123 and cfg.data.sources[0].path == "/x"


@pytest.mark.parametrize(
    "overrides, key, needle",
    [
        (["optim.lrr=1"], "optim.lrr", "did you mean optim.lr"),
        (["modell.name=x"], "modell", "did you mean model"),
        (["data.sources[0].pathh=/x"], "data.sources[0].pathh", "did you mean data.sources[0].path"),
        (["train.max_steps=abc"], "train.max_steps", "abc"),
        (["train.precision=fp16"], "train.precision", "bf16, fp32"),
        (["optim.warmup_steps=100000"], "optim.warmup_steps", "train.max_steps"),
        (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "deepspeed.offload_params", "zero_stage=3"),
        (["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer", ">= 2"),
        (["train.stop_at_step=100000"], "train.stop_at_step", "train.max_steps"),
        (["model.trainable=[]"], "model.trainable", "nothing would train"),
        (["data.sources=[]"], "data.sources", "at least one source"),
        (["data.image_decode=gpu"], "data.image_decode", "workers, device"),
    ],
)
def test_errors_name_the_key(overrides, key, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert e.value.key == key
    assert needle in str(e.value)


def test_missing_required_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  sources:\n    - {name: a, path: /x}\nmodel:\n  tokenizer: t\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(recipe))
    assert e.value.key == "model.name"


def test_derived_batch_and_conflicts():
    cfg, _ = load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=null", "train.global_batch_size=32"])
    assert derive_batch(cfg, 2) == {"world_size": 2, "micro_batch_size": 4, "grad_accum_steps": 4, "global_batch_size": 32}
    with pytest.raises(ConfigError, match="not a multiple"):
        derive_batch(cfg, 3)
    cfg, _ = load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=32"])
    assert derive_batch(cfg, 4)["global_batch_size"] == 32  # consistent: allowed
    with pytest.raises(ConfigError) as e:
        derive_batch(cfg, 2)
    assert e.value.key == "train.global_batch_size" and "conflicts" in str(e.value)


def test_deepspeed_json_follows_schema():
    cfg, _ = load_config(TINY, ["train.micro_batch_size=2", "train.grad_accum_steps=3", "train.global_batch_size=null",
                                "train.precision=fp32",
                                "deepspeed.extra={zero_optimization: {round_robin_gradients: true}}"])
    ds = deepspeed_json(cfg, 4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["gradient_clipping"] == cfg.optim.grad_clip_norm


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmtrain.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_validate_prints_resolved_config_without_building():
    done = _cli("validate", TINY, "--world-size", "2", "train.micro_batch_size=3", "train.grad_accum_steps=5",
                "train.global_batch_size=null")
    assert done.returncode == 0, done.stderr
    derived = done.stdout.split("# derived\n", 1)[1].split("# deepspeed config\n")
    assert json.loads(derived[0])["global_batch_size"] == 30
    assert json.loads(derived[1])["train_batch_size"] == 30
    assert "micro_batch_size: 3" in done.stdout


def test_validate_fails_nonzero_naming_the_key():
    done = _cli("validate", TINY, "optim.lrr=1")
    assert done.returncode == 2
    assert "optim.lrr" in done.stderr and "did you mean optim.lr" in done.stderr
    done = _cli("train", TINY, "train.max_steps=abc")
    assert done.returncode == 2 and "train.max_steps" in done.stderr


@pytest.mark.parametrize(
    "override, key, needle",
    [
        ("model.trainable=[perceiver,crossattn]", "model.trainable[1]", "did you mean cross_attn"),
        ("model.name=otter-tiyn", "model.name", "did you mean 'otter-tiny'"),
    ],
)
def test_model_section_checked_before_building(override, key, needle):
    done = _cli("validate", TINY, override)
    assert done.returncode == 2
    assert f"{key}:" in done.stderr and needle in done.stderr


def test_validate_lists_trainable_and_frozen_groups():
    done = _cli("validate", TINY, "model.trainable=[perceiver,cross_attn,new_tokens]")
    derived = json.loads(done.stdout.split("# derived\n", 1)[1].split("# deepspeed config\n")[0])
    assert derived["trainable_groups"] == ["perceiver", "cross_attn", "new_tokens"]
    assert derived["frozen_groups"] == ["vision", "decoder"]
