"""The Trainer: setup, then a step loop that reads top to bottom.

    trainer = Trainer(cfg)
    trainer.setup()      # process group, tokenizer, model (under zero.Init), data, DeepSpeed engine, resume
    trainer.train()      # steps, checkpoints, evaluation
    trainer.close()
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from typing import Any, Dict, Optional

import numpy as np
import torch

from mmtrain.config import RunConfig, deepspeed_json, derive_batch, to_yaml
from mmtrain.data.stream import build_train_loader, iter_eval_prompts
from mmtrain.data.tokenizer import TokenIds, load_tokenizer
from mmtrain.engine import checkpoint, distributed
from mmtrain.engine.build import build_run_model
from mmtrain.engine.evaluate import evaluate
from mmtrain.engine.metrics import MetricsWriter, library_versions, peak_tflops, setup_logging
from mmtrain.engine.optim import (
    apply_freeze_policy,
    build_optimizer,
    build_scheduler,
    check_model_section,
    group_lrs,
    group_table_text,
    lr_multiplier,
)
from mmtrain.models.registry import get_spec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_inputs(batch: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    """The batch's tensors on the device, as the model's keyword arguments; dtypes unchanged (pixels
    stay uint8 and the model normalises them, ids stay long). `meta` is for logs, not the model."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0
        self.metrics: Optional[MetricsWriter] = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = distributed.init_distributed(cfg.dist.timeout_s)
        rank, world = self.dist.rank, self.dist.world_size
        self.run_dir = os.path.join(cfg.output_dir, cfg.run_name)
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        if rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        distributed.barrier()
        self.log = setup_logging(self.run_dir, rank)
        self.batch_sizes = derive_batch(cfg, world)
        self.ds_config = deepspeed_json(cfg, world)
        self.dtype = DTYPES[cfg.train.precision]
        # Same seed on every rank: identical initialisation of every new parameter.
        seed_everything(cfg.train.seed)

        self.tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.data.template)
        self.token_ids = TokenIds.from_tokenizer(self.tokenizer, cfg.data.template)
        self.model = self._build_model()
        _, self.trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
        self.group_table = apply_freeze_policy(self.model, self.trainable)
        self.model.gradient_checkpointing = cfg.model.activation_checkpointing
        self._log_groups()

        import deepspeed

        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )

        spec = get_spec(cfg.model.name)
        self.image_spec = spec.image_spec(self.model.config)
        self.loader = build_train_loader(
            cfg.data.sources,
            self.tokenizer,
            self.token_ids,
            self.image_spec,
            template=cfg.data.template,
            max_seq_tokens=cfg.data.max_seq_tokens,
            max_images=cfg.data.max_images,
            micro_batch_size=self.batch_sizes["micro_batch_size"],
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            shuffle_buffer_samples=cfg.data.shuffle_buffer_samples,
            packing=cfg.data.packing,
            max_doc_images=cfg.data.max_doc_images,
            max_frames=cfg.data.max_frames,
            image_min_px=cfg.data.image_min_px,
            image_max_px=cfg.data.image_max_px,
        )
        self._maybe_resume()
        self.data_iter = iter(self.loader)
        if rank == 0:
            self._write_run_files()
            self.metrics = MetricsWriter(self.run_dir)
        self.log.info(
            "world %d | micro-batch %d x accumulation %d x world %d = global batch %d | %s on %s",
            world, self.batch_sizes["micro_batch_size"], self.batch_sizes["grad_accum_steps"], world,
            self.batch_sizes["global_batch_size"], cfg.train.precision, self.dist.device,
        )

    def _build_model(self) -> torch.nn.Module:
        return build_run_model(self.cfg, self.ds_config, self.token_ids.as_dict(), self.dist.device, self.dtype,
                               self.dist.rank, self.log)

    def _log_groups(self) -> None:
        lrs = group_lrs(self.model, self.cfg.optim)
        self.log.info("parameter groups (training %s):\n%s", self.trainable,
                      group_table_text(self.group_table, lrs))

    def _write_run_files(self) -> None:
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(f"# mmtrain versions: {json.dumps(library_versions())}\n")
            f.write(f"# derived: {json.dumps(self.batch_sizes)}\n")
            f.write(to_yaml(self.cfg))
        with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
            json.dump(self.ds_config, f, indent=1)
        self.tokenizer.save_pretrained(os.path.join(self.run_dir, "tokenizer"))

    # ----------------------------------------------------------------- resume
    def _maybe_resume(self) -> None:
        resume = self.cfg.resume
        if resume == "none":
            return
        path = checkpoint.latest_checkpoint(self.ckpt_root) if resume == "auto" else checkpoint.resolve_checkpoint(resume)
        if path is None:
            self.log.info("resume=auto: no complete checkpoint in %s, starting fresh", self.ckpt_root)
            return
        self._restore(path)
        self.log.info("resumed from %s at step %d", path, self.step)

    def _restore(self, path: str) -> None:
        """Collective: weights, optimizer, scheduler, step, data cursor and RNG streams from one
        complete checkpoint (resume, and a guard's rollback)."""
        state = checkpoint.load(self.engine, path, self.dist.rank, self.dist.world_size)
        self.step = state["trainer"]["step"]
        self.loader.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> str:
        path = checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.step,
            self.dist.rank,
            self.dist.world_size,
            rank_state={"rng": checkpoint.rng_state(), "data": self.loader.state_dict()},
            trainer_state={"step": self.step},
            extra_files={
                "config.yaml": to_yaml(self.cfg),
                "mmtrain_model.json": json.dumps(self.model.config_dict(), indent=1),
            },
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg
        every_ckpt, every_eval = cfg.checkpoint.every_steps, cfg.eval.every_steps
        last_saved = self.step
        stop = cfg.train.max_steps if cfg.train.stop_at_step is None else cfg.train.stop_at_step
        while self.step < stop:
            record = self.train_step()
            if self.metrics is not None:
                self.metrics.write(record)
            if self.step % cfg.train.log_every_steps == 0 or self.step == cfg.train.max_steps:
                grad_norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
                self.log.info(
                    "step %d/%d loss %.4f z %.3f lr %.3g grad_norm %s tokens/s %.0f data_wait %.3fs",
                    self.step, cfg.train.max_steps, record["loss"], record["z_loss"], record["lr"],
                    grad_norm, record["tokens_per_s"], record["data_wait_s"],
                )
            if every_ckpt and self.step % every_ckpt == 0:
                self.save_checkpoint()
                last_saved = self.step
            if every_eval and cfg.data.eval_path and self.step % every_eval == 0:
                self.run_eval()
        if last_saved != self.step:
            self.save_checkpoint()
        finished = self.step == cfg.train.max_steps
        if finished and cfg.data.eval_path and not (every_eval and self.step % every_eval == 0):
            self.run_eval()

    def train_step(self) -> Dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        device = self.dist.device
        # The rate this step's update uses (of `optim.lr`; groups in optim.group_lr scale alike).
        lr = cfg.optim.lr * lr_multiplier(self.step, cfg.optim, cfg.train.max_steps)
        start = time.perf_counter()
        data_wait_s = 0.0
        sums = torch.zeros(6, dtype=torch.float64)  # loss, ce, z, tokens, samples, packing efficiency
        meta: Dict[str, Any] = {}
        for _ in range(self.batch_sizes["grad_accum_steps"]):
            wait_start = time.perf_counter()
            batch = next(self.data_iter)
            data_wait_s += time.perf_counter() - wait_start
            meta = batch["meta"]
            out = engine(**model_inputs(batch, device), z_loss_weight=cfg.train.z_loss_weight)
            engine.backward(out.loss)
            engine.step()
            sums += torch.tensor([out.loss.item(), out.ce_loss.item(), out.z_loss.item(),
                                  float(batch["attention_mask"].sum()), float(len(meta["sample_ids"])),
                                  meta["packing_efficiency"]],
                                 dtype=torch.float64)
        self.step += 1
        step_time_s = time.perf_counter() - start
        reduce_device = device if device.type == "cuda" else torch.device("cpu")
        totals = distributed.all_reduce_sum(sums.to(reduce_device)).cpu()
        micro_steps = self.batch_sizes["grad_accum_steps"] * self.dist.world_size
        tokens, samples = int(totals[3]), int(totals[4])
        grad_norm = engine.get_global_grad_norm()
        record: Dict[str, Any] = {
            "step": self.step,
            "loss": float(totals[0] / micro_steps),
            "ce_loss": float(totals[1] / micro_steps),
            "z_loss": float(totals[2] / micro_steps),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": tokens,
            "samples": samples,
            "step_time_s": step_time_s,
            "tokens_per_s": tokens / step_time_s,
            "samples_per_s": samples / step_time_s,
            "packing_efficiency": float(totals[5] / micro_steps),
            "data_wait_s": data_wait_s,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if device.type == "cuda":
            record["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["mfu"] = self._mfu(tokens, step_time_s)
        skipped = meta.get("skipped")
        if skipped is not None:
            record["skipped_samples"] = self._sum_counts(skipped)
        return record

    def _mfu(self, tokens: int, step_time_s: float) -> Optional[float]:
        """Frozen-aware MFU over the decoder: 4 N_frozen + 6 N_trainable FLOPs per token (vision and
        attention terms are not counted yet, so this undercounts); None where the chip's peak is unknown."""
        peak = peak_tflops()
        if peak is None:
            return None
        frozen = sum(r["num_params"] - r["num_trainable"] for g, r in self.group_table.items() if g != "vision")
        trained = sum(r["num_trainable"] for r in self.group_table.values())
        flops = (4 * frozen + 6 * trained) * tokens
        return flops / step_time_s / (peak * 1e12 * self.dist.world_size)

    def _sum_counts(self, counts: Dict[str, int]) -> Dict[str, int]:
        if self.dist.world_size == 1:
            return dict(counts)
        gathered = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, dict(counts))
        total: Dict[str, int] = {}
        for part in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0) + int(value)
        return total

    # ------------------------------------------------------------------- eval
    def run_eval(self) -> Dict[str, Any]:
        cfg = self.cfg
        prompts = iter_eval_prompts(
            cfg.data.eval_path, self.tokenizer, self.token_ids, self.image_spec,
            template=cfg.data.template, max_seq_tokens=cfg.data.max_seq_tokens,
            max_images=cfg.data.max_images, max_samples=cfg.eval.max_samples, max_frames=cfg.data.max_frames,
        )
        result = evaluate(
            self.engine.module, prompts, self.tokenizer,
            stop_ids=[self.token_ids.end_of_chunk, self.token_ids.eos],
            max_new_tokens=cfg.eval.max_new_tokens, device=self.dist.device,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.log.info("eval step %d: accuracy %.4f on %d samples", self.step, result["accuracy"], result["num_samples"])
        if self.metrics is not None:
            self.metrics.write_eval(self.step, result)
        return result

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        distributed.destroy()
