"""Engine parts that need no process group: freeze policy, AdamW groups, LR schedule, checkpoint lookup,
answer matching."""

import copy
import math
import os

import pytest
import torch

from mmtrain.config.schema import ConfigError, OptimConfig
from mmtrain.engine import checkpoint
from mmtrain.engine.evaluate import normalize_answer
from mmtrain.engine.optim import adamw_param_groups, apply_freeze_policy, check_model_section, lr_multiplier
from mmtrain.models.registry import build_model

TOKEN_IDS = {"image": 50, "end_of_chunk": 51, "answer": 52, "bos": 1, "eos": 2, "pad": 3,
             "base_vocab_size": 50, "num_added_tokens": 3}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("otter-tiny", {}, TOKEN_IDS)


def test_freeze_policy_follows_the_recipe(model):
    table = apply_freeze_policy(model, ["perceiver", "cross_attn", "new_tokens"])
    groups = model.param_groups()
    for name, params in groups.items():
        want = name in ("perceiver", "cross_attn", "new_tokens")
        assert all(p.requires_grad == want for _, p in params), name
        total = sum(p.numel() for _, p in params)
        assert table[name] == {"trainable": int(want), "num_params": total, "num_trainable": total if want else 0}


def test_group_learning_rates_and_startup_table(model):
    from mmtrain.config.schema import OptimConfig
    from mmtrain.engine.optim import adamw_param_groups, group_lrs, group_table_text

    table = apply_freeze_policy(model, ["perceiver", "cross_attn"])
    cfg = OptimConfig(lr=1e-4, group_lr={"cross_attn": 3e-4})
    groups = adamw_param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert by_name["cross_attn"]["lr"] == 3e-4 and by_name["perceiver"]["lr"] == 1e-4
    assert by_name["cross_attn.no_decay"]["weight_decay"] == 0.0  # the gates
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    text = group_table_text(table, group_lrs(model, cfg))
    assert "cross_attn" in text and "0.0003" in text and text.splitlines()[-1].startswith("total")
    with pytest.raises(ConfigError) as e:
        check_model_section("otter-tiny", ["perceiver"], {"decoder": 1e-5})
    assert e.value.key == "optim.group_lr.decoder"


def test_a_parameter_in_no_group_is_caught(model, monkeypatch):
    groups = model.param_groups()
    groups["perceiver"] = groups["perceiver"][1:]
    monkeypatch.setattr(model, "param_groups", lambda: groups)
    with pytest.raises(RuntimeError, match="in no group"):
        apply_freeze_policy(model, ["perceiver"])


def test_parameters_built_frozen_stay_frozen(model):
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "vision_encoder.positional_embedding" in fixed  # the tiny tower's sin-cos table
    apply_freeze_policy(model, ["vision", "perceiver"])
    params = dict(model.named_parameters())
    assert not params["vision_encoder.positional_embedding"].requires_grad
    assert params["vision_encoder.conv1.weight"].requires_grad


def test_unset_trainable_takes_the_flavour_default():
    assert check_model_section("otter-tiny", None)[1] == ["perceiver", "cross_attn", "new_tokens"]
    groups, trainable = check_model_section("fuyu-tiny", None)
    assert trainable == list(groups)  # OtterHD: full fine-tune


def test_unknown_group_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        check_model_section("otter-tiny", ["perceiver", "xattn"])
    assert e.value.key == "model.trainable[1]"


def test_no_weight_decay_on_norms_biases_gates_embeddings(model):
    apply_freeze_policy(model, ["perceiver", "cross_attn", "decoder", "new_tokens"])
    groups = adamw_param_groups(model, OptimConfig(weight_decay=0.1))
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    no_decay = [n for n, p in named.items() if by_id.get(id(p)) == 0.0]
    decay = [n for n, p in named.items() if by_id.get(id(p)) == 0.1]
    assert any("attn_gate" in n for n in no_decay) and any("ff_gate" in n for n in no_decay)
    assert any(n.endswith("norm.weight") for n in no_decay)
    assert "decoder.embed_tokens.additional_embedding.weight" in no_decay
    assert not any(n.endswith(("attn_gate", "ff_gate", "bias")) or "norm" in n.split(".")[-2] for n in decay)
    assert any(n.endswith("q_proj.weight") for n in decay)
    assert not any(n.startswith("vision_encoder.") for n in decay + no_decay)  # frozen: not in the optimizer


def test_warmup_then_cosine_schedule():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    values = [lr_multiplier(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_multiplier(50, OptimConfig(warmup_steps=0, schedule="constant"), 100) == 1.0
    assert lr_multiplier(50, OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100) == pytest.approx(0.5)


def test_only_complete_checkpoints_are_found(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((100, True), (200, True), (300, False)):
        d = root / checkpoint.step_dir_name(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.COMPLETE).write_text(f"{step}\n")
    (root / "step_0000400.partial").mkdir()
    assert checkpoint.latest_checkpoint(str(root)) == str(root / "step_0000200")
    assert checkpoint.resolve_checkpoint(str(tmp_path)) == str(root / "step_0000200")
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.resolve_checkpoint(str(root / "step_0000300"))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.resolve_checkpoint(str(tmp_path / "nowhere"))
    assert os.path.isdir(root / "step_0000300")


def test_answer_matching_ignores_case_space_and_end_punctuation():
    assert normalize_answer("  Red  Top left. ") == normalize_answer("red top left")
    assert normalize_answer("red") != normalize_answer("green")


def test_attention_choice_is_explicit_and_checked(monkeypatch):
    import importlib.util

    from mmtrain.engine.attention import choose_attention
    from mmtrain.models.registry import get_spec

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    flamingo, fuyu, mpt = get_spec("otter-tiny"), get_spec("fuyu-tiny"), get_spec("openflamingo-tiny-mpt")
    choice = choose_attention("auto", flamingo, {"decoder": {"num_hidden_layers": 2}}, cpu, torch.bfloat16)
    assert (choice.decoder, choice.cross) == ("sdpa", "sdpa") and "CUDA" in choice.decoder_why
    assert choice.overrides == {"decoder": {"num_hidden_layers": 2, "attn_implementation": "sdpa"},
                                "cross_attn_implementation": "sdpa"}
    assert "cross-attention: sdpa" in choice.describe()
    # On CUDA: single-document rows keep SDPA (causal kernels, the small dense image mask); packed
    # rows and MPT's ALiBi go to flex, and so does cross-attention with packed rows.
    single = choose_attention("auto", flamingo, {}, cuda, torch.bfloat16)
    assert (single.decoder, single.cross) == ("sdpa", "sdpa")
    packed = choose_attention("auto", flamingo, {}, cuda, torch.bfloat16, packing=True)
    assert (packed.decoder, packed.cross) == ("flex_attention", "flex_attention") and "packed" in packed.decoder_why
    assert choose_attention("auto", mpt, {}, cuda, torch.bfloat16).decoder == "flex_attention"
    assert choose_attention("auto", mpt, {}, cpu, torch.float32).decoder == "sdpa"
    assert choose_attention("auto", fuyu, {}, cuda, torch.bfloat16, packing=True).decoder == "flex_attention"
    fuyu_choice = choose_attention("auto", fuyu, {}, cuda, torch.bfloat16)
    assert (fuyu_choice.decoder, fuyu_choice.cross) == ("sdpa", "") and "cross_attn_implementation" not in fuyu_choice.overrides
    assert choose_attention("auto", flamingo, {}, cuda, torch.bfloat16, requested_cross="flex_attention").cross == "flex_attention"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attention("auto", flamingo, {}, cuda, torch.bfloat16, packing=True).decoder == "flash_attention_2"
    assert choose_attention("auto", flamingo, {}, cuda, torch.float32).decoder == "sdpa"
    assert choose_attention("auto", fuyu, {}, cuda, torch.bfloat16).decoder == "sdpa"  # no flash path (packing)
    assert choose_attention("eager", fuyu, {}, cpu, torch.float32).decoder == "eager"
    for requested, cross, device, key in (("flash_attention_2", "auto", cuda, "model.attention"),
                                          ("flex_attention", "auto", cpu, "model.attention"),
                                          ("auto", "flex_attention", cpu, "model.cross_attention")):
        with pytest.raises(ConfigError) as e:
            choose_attention(requested, fuyu if requested == "flash_attention_2" else flamingo, {}, device,
                             torch.bfloat16, requested_cross=cross)
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        choose_attention("auto", fuyu, {}, cpu, torch.float32, requested_cross="sdpa")
    assert e.value.key == "model.cross_attention" and "no cross-attention" in str(e.value)
    with pytest.raises(ConfigError):
        choose_attention("auto", flamingo, {"decoder": {"attn_implementation": "eager"}}, cpu, torch.float32)
    with pytest.raises(ConfigError):
        choose_attention("auto", flamingo, {"cross_attn_implementation": "sdpa"}, cpu, torch.float32)


@pytest.mark.parametrize("trainable,layer0_backward", [(["perceiver", "cross_attn"], False),
                                                        (["perceiver", "cross_attn", "new_tokens"], True)])
def test_no_backward_below_the_first_trainable_module(model, trainable, layer0_backward):
    """otter-tiny's first gated block sits before decoder layer 1: with the decoder and the token
    tables frozen nothing below it needs gradients, so layer 0 runs no backward at all; training the
    new-token rows (input embeddings) needs the backward down to the embedding."""
    apply_freeze_policy(model, trainable)
    model.train()
    ran = {i: 0 for i in range(len(model.decoder.layers))}
    for i, layer in enumerate(model.decoder.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: ran.__setitem__(i, ran[i] + 1))
    ids = torch.tensor([[1, 5, 50, 6, 7, 51, 2]])
    out = model(ids, torch.zeros(1, 1, 3, 32, 32, dtype=torch.uint8), labels=ids)
    out.loss.backward()
    assert ran[0] == int(layer0_backward)
    assert all(ran[i] == 1 for i in range(1, len(ran)))


def test_optimizer_kind_follows_device_and_offload(model):
    from mmtrain.config.schema import OptimConfig
    from mmtrain.engine.optim import build_optimizer, optimizer_kind

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for device in (cpu, cuda):  # under offload the states are on the host, whatever the device
        assert optimizer_kind(device, True, "torch_fused") == "fused"
        assert optimizer_kind(device, True, "deepspeed_cpu_adam") == "cpu_adam"
    assert optimizer_kind(cuda, False, "deepspeed_cpu_adam") == "fused"
    assert optimizer_kind(cpu, False, "torch_fused") == "torch"
    optimizer = build_optimizer(model, OptimConfig(), "torch")
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    with pytest.raises(ValueError, match="optimizer kind"):
        build_optimizer(model, OptimConfig(), "adam8bit")


def _stepped(optimizer, param):
    param.grad = torch.full_like(param, 0.5)
    optimizer.step()
    return optimizer


def test_adamw_states_resume_across_kinds():
    """DeepSpeed's CPU Adam keeps each step count as a Python int, torch's AdamW a float32 tensor
    (fused: one its kernel reads). A checkpoint of one kind loads into the other, and the loaded
    optimizer steps on from the saved count (deepspeed.offload_adam switched between runs)."""
    from mmtrain.engine.optim import build_optimizer

    def one_param_model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1, bias=False)

    class OneGroup(torch.nn.Module):  # the param_groups / no_weight_decay contract, one group
        def __init__(self):
            super().__init__()
            self.inner = one_param_model()

        def param_groups(self):
            return {"all": list(self.inner.named_parameters())}

        def no_weight_decay(self, name):
            return False

    kinds = ("cpu_adam", "fused", "torch")
    saved = {}
    for kind in kinds:
        module = OneGroup()
        optimizer = build_optimizer(module, OptimConfig(lr=0.1), kind)
        for _ in range(3):
            _stepped(optimizer, module.inner.weight)
        saved[kind] = (copy.deepcopy(optimizer.state_dict()), module.inner.weight.detach().clone())
    assert isinstance(saved["cpu_adam"][0]["state"][0]["step"], int)
    assert torch.is_tensor(saved["fused"][0]["state"][0]["step"])
    for source in kinds:
        for target in kinds:
            module = OneGroup()
            with torch.no_grad():
                module.inner.weight.copy_(saved[source][1])
            optimizer = build_optimizer(module, OptimConfig(lr=0.1), target)
            optimizer.load_state_dict(copy.deepcopy(saved[source][0]))  # as read from a file: nothing shared
            _stepped(optimizer, module.inner.weight)  # DeepSpeed's kernel refuses a tensor step
            assert float(optimizer.state[module.inner.weight]["step"]) == 4, (source, target)
            if target == "fused":  # still the fused kernel after loading another kind's groups
                assert optimizer.param_groups[0]["fused"] is True, source
            assert torch.isfinite(module.inner.weight).all()


def test_pinned_upload_stays_out_where_it_does_not_apply():
    """The pinned upload (mmtrain/engine/offload.py) is only for host-to-GPU copies of ZeRO-3's
    offloaded master weights; a sub-group that is not one goes to DeepSpeed's own copy, in order.
    (tests/gpu/test_offload_gpu.py checks the upload itself on a GPU.)"""
    from types import SimpleNamespace

    from mmtrain.config.schema import DeepSpeedConfig
    from mmtrain.engine.offload import _PinnedUpload, install_pinned_upload, tune_offload

    copied = []
    zero3 = SimpleNamespace(
        offload_optimizer=True, fp16_groups=[[], []], _unflatten_partitioned_parameters=None,
        fp16_partitioned_groups_flat=[torch.zeros(4, dtype=torch.bfloat16), None],
        fp32_partitioned_groups_flat=[torch.zeros(4), torch.zeros(4)],
        _reassign_or_swap_out_partitioned_parameters=copied.append,
    )
    upload = _PinnedUpload(zero3)
    assert not upload.applies(0)  # bf16 partition on the host (CPU run)
    assert not upload.applies(1)  # no 16-bit partition (parameter offload swaps it out)
    upload(0)
    upload(1)
    assert copied == [0, 1] and upload.last_upload is None
    upload.pin_masters()
    assert not zero3.fp32_partitioned_groups_flat[0].is_pinned()  # left where DeepSpeed put it
    # Not installed without CUDA, nor on an optimizer that is not DeepSpeed's ZeRO-3 one.
    assert not install_pinned_upload(zero3)
    assert not install_pinned_upload(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert zero3._reassign_or_swap_out_partitioned_parameters == copied.append
    engine = SimpleNamespace(optimizer=zero3)
    nothing = {"folded_clip": False, "pinned_upload": False, "host_threads": None}
    cpu = torch.device("cpu")
    assert tune_offload(engine, DeepSpeedConfig(offload_optimizer=False), cpu, 1) == nothing
    assert tune_offload(engine, DeepSpeedConfig(offload_optimizer=True, offload_pinned_upload=False), cpu, 1) == nothing


def test_upload_rounded_covers_every_element_in_chunks():
    """The pinned upload's chunking (on a GPU the chunks travel as fp32 and are rounded there;
    tests/gpu/test_offload_gpu.py): every element lands once, rounded as a whole-tensor cast
    rounds it, whether the chunks divide the partition or leave a short last one."""
    from mmtrain.engine.offload import upload_rounded

    high = torch.randn(10_007, generator=torch.Generator().manual_seed(0)) * 3
    for chunk in (1, 4099, 10_007, 1 << 25):
        low = torch.full((10_007,), float("nan"), dtype=torch.bfloat16)
        upload_rounded(high, low, chunk)
        assert torch.equal(low, high.to(torch.bfloat16)), chunk


def test_host_threads_are_the_ranks_share_of_its_cores(monkeypatch):
    """torchrun leaves OMP_NUM_THREADS=1 in every rank of a multi-rank host; the host AdamW under
    offload takes the rank's share of the cores instead (deepspeed.offload_host_threads=0)."""
    from mmtrain.engine import offload

    all16, low, high = frozenset(range(16)), frozenset(range(8)), frozenset(range(8, 16))
    # torchrun: 4 ranks of a host, each allowed every core.
    assert offload.ranks_sharing_cores(("a", all16), [("a", all16)] * 4 + [("b", all16)] * 4) == 4
    # Bound by the launcher, two ranks per half of the cores; another host's ranks never count.
    everyone = [("a", low), ("a", low), ("a", high), ("a", high), ("b", low)]
    assert offload.ranks_sharing_cores(("a", low), everyone) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(offload.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert offload.host_threads(0, 1) == 16
    assert offload.host_threads(0, 4) == 4
    assert offload.host_threads(0, 32) == 1
    assert offload.host_threads(6, 4) == 6  # the recipe's number wins
    monkeypatch.setattr(offload.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
    assert offload.host_threads(0, 1) == 4  # bound to 4 cores of its own
    # Only GPU runs are re-threaded; CPU ranks keep what init_distributed gave them.
    before = torch.get_num_threads()
    from types import SimpleNamespace

    from mmtrain.config.schema import DeepSpeedConfig

    engine = SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    tuned = offload.tune_offload(engine, DeepSpeedConfig(offload_optimizer=True), torch.device("cpu"), 4)
    assert tuned["host_threads"] is None and torch.get_num_threads() == before
