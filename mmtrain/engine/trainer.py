"""The Trainer: setup, then a step loop that reads top to bottom.

    trainer = Trainer(cfg)
    trainer.setup()      # process group, tokenizer, model (under zero.Init), data, DeepSpeed engine, resume
    trainer.train()      # steps, checkpoints, evaluation
    trainer.close()
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mmtrain.config import RunConfig, deepspeed_json, derive_batch, to_yaml
from mmtrain.data.stream import build_train_loader, iter_eval_prompts
from mmtrain.data.tokenizer import TokenIds, load_tokenizer
from mmtrain.engine import checkpoint, distributed
from mmtrain.engine.build import build_run_engine, build_run_model
from mmtrain.engine.evaluate import evaluate
from mmtrain.engine.flops import mfu, model_shape, train_step_flops
from mmtrain.engine.guards import DECISIONS, OK, ROLLED_BACK, SKIP_REASONS, FaultPlan, GuardAbort, StepGuard, Verdict
from mmtrain.engine.metrics import (
    MetricsWriter,
    ProgressReporter,
    library_versions,
    max_memory_gib,
    peak_tflops,
    setup_logging,
)
from mmtrain.engine.optim import (
    apply_freeze_policy,
    check_model_section,
    group_lrs,
    group_table_text,
    lr_multiplier,
)
from mmtrain.engine.preemption import PREEMPTED_EXIT_CODE, StopSignals, signal_name
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


# The step's totals, summed over ranks and micro-batches, and the row each rank fills in the step's
# table (Trainer._reduce_step); `signal` holds the stop signal's number, 0 for none.
_STEP_SUMS = ("loss", "ce_loss", "z_loss", "tokens", "samples", "packing_efficiency", "images", "rows")
_RANK_ROW = ("nonfinite", "signal", "data_wait_s", "max_rss_gib", "max_gpu_mem_gib", "skipped")


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0
        self.metrics: Optional[MetricsWriter] = None
        # Step-loop state of the guards, preemption and metrics (train, train_step).
        self.stop_signals = StopSignals()  # main() installs it before setup, so no signal is lost
        self.guard = StepGuard(cfg.guards)
        self.faults = FaultPlan.from_env()
        self._stop_ranks: Dict[int, int] = {}
        self._rollback_path: Optional[str] = None
        self._window_sample_ids: List[str] = []
        self._window_samples = 0
        self._guard_skipped: Counter = Counter()
        self._data_skipped: Dict[str, int] = {}
        self._data_skipped_total = -1
        self._skipped_before: Dict[str, int] = {}

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
        # Found before the build: the model's init_from skips the weights this checkpoint restores.
        self._resume_path = self._resume_checkpoint()
        self.model = self._build_model()
        _, self.trainable = check_model_section(cfg.model.name, cfg.model.trainable, cfg.optim.group_lr)
        self.group_table = apply_freeze_policy(self.model, self.trainable)
        self.model.set_activation_checkpointing(cfg.model.activation_checkpointing, cfg.model.checkpoint_every_n_layers)
        self._log_groups()

        self.engine, self.scheduler = build_run_engine(self.model, cfg, self.ds_config, self.dist.device,
                                                       self.dist.local_world_size, self.log)

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
            image_decode=cfg.data.image_decode,
            decode_device=self.dist.device,
        )
        self._maybe_resume()
        self.data_iter = iter(self.loader)
        if rank == 0:
            self._write_run_files()
            self.metrics = MetricsWriter(self.run_dir, cfg.tensorboard_dir)
        self.log.info(
            "world %d | micro-batch %d x accumulation %d x world %d = global batch %d | %s on %s",
            world, self.batch_sizes["micro_batch_size"], self.batch_sizes["grad_accum_steps"], world,
            self.batch_sizes["global_batch_size"], cfg.train.precision, self.dist.device,
        )

    def _build_model(self) -> torch.nn.Module:
        return build_run_model(self.cfg, self.ds_config, self.token_ids.as_dict(), self.dist.device, self.dtype,
                               self.dist.rank, self.log, resume_from=self._resume_path)

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
    def _resume_checkpoint(self) -> Optional[str]:
        """The complete checkpoint that `resume` names (auto: the newest of this run), or None."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        return checkpoint.latest_checkpoint(self.ckpt_root) if resume == "auto" else checkpoint.resolve_checkpoint(resume)

    def _maybe_resume(self) -> None:
        resume = self.cfg.resume
        if resume == "none":
            return
        path = self._resume_path
        if path is None:
            self.log.info("resume=auto: no complete checkpoint in %s, starting fresh", self.ckpt_root)
        else:
            trainer_state = self._restore(path)
            # The guard's window and counts continue (a rollback, which also restores, keeps its own).
            if "guard" in trainer_state:
                self.guard.load_state_dict(trainer_state["guard"])
                self._guard_skipped = Counter(trainer_state["guard_skipped"])
            self.log.info("resumed from %s at step %d", path, self.step)
        if self.dist.rank == 0:
            # A killed run logged steps past its last checkpoint; they are trained again now, so
            # the logs keep each step once: the run's true history.
            for name in ("metrics.jsonl", "eval.jsonl"):
                dropped = checkpoint.truncate_step_log(os.path.join(self.run_dir, name), self.step)
                if dropped:
                    self.log.info("%s: dropped %d records after step %d (trained again)", name, dropped, self.step)

    def _restore(self, path: str) -> Dict[str, Any]:
        """Collective: weights, optimizer, scheduler, step, data cursor and RNG streams from one
        complete checkpoint (resume, and a guard's rollback). Returns the saved trainer state."""
        state = checkpoint.load(self.engine, path, self.dist.rank, self.dist.world_size,
                                trainable_groups=self.trainable, log=self.log)
        self.step = state["trainer"]["step"]
        if state["exact"]:
            self.loader.load_state_dict(state["data"])
        else:
            # Another world size: the saved cursors do not map onto the new split of the shards.
            data = state["data"]
            if state["trainer"]["world_size"] == self.dist.world_size:
                data = data[self.dist.rank]
            else:
                data = checkpoint.remap_data_cursor(data, self.loader.state_dict())
                self.log.info("data: %d saved ranks -> %d ranks: every source restarts at a fresh epoch %s "
                              "(see checkpoint.remap_data_cursor)", state["trainer"]["world_size"],
                              self.dist.world_size, {k: v["epoch"] for k, v in data["workers"][0]["sources"].items()})
            self.loader.load_state_dict(data)
        checkpoint.set_rng_state(state["rng"])
        return state["trainer"]

    def save_checkpoint(self) -> str:
        path = checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.step,
            self.dist.rank,
            self.dist.world_size,
            rank_state={"rng": checkpoint.rng_state(), "data": self.loader.state_dict()},
            trainer_state={"step": self.step, "trainable_groups": list(self.trainable),
                           "guard": self.guard.state_dict(), "guard_skipped": dict(self._guard_skipped)},
            extra_files={
                "config.yaml": to_yaml(self.cfg),
                "mmtrain_model.json": json.dumps(self.model.config_dict(), indent=1),
            },
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ train
    def train(self) -> int:
        """Steps until train.stop_at_step (or max_steps), with checkpoints, evaluation and guards.

        Returns the process exit code: 0, or PREEMPTED_EXIT_CODE once a stop signal reached any rank
        (every rank then saved its part of one complete checkpoint at the step reached). Raises
        GuardAbort after guards.max_consecutive_bad_steps bad steps in a row.
        """
        cfg = self.cfg
        if not self.stop_signals.installed:
            self.stop_signals.install()
        every_ckpt, every_eval = cfg.checkpoint.every_steps, cfg.eval.every_steps
        last_saved = self.step
        stop = cfg.train.max_steps if cfg.train.stop_at_step is None else cfg.train.stop_at_step
        # Rollback needs a checkpoint of this run: the one just resumed from, later the last saved.
        resumed = checkpoint.latest_checkpoint(self.ckpt_root) if self.step else None
        self._rollback_path = resumed if resumed and resumed.endswith(checkpoint.step_dir_name(self.step)) else None
        self._data_skip_counts()  # the baseline for per-step counts (a resumed cursor holds earlier ones)
        self._skipped_before = {**self._data_skipped, **self._guard_skipped}
        progress = None
        if self.dist.rank == 0:
            progress = ProgressReporter(self.log, cfg.train.max_steps, self.step, cfg.train.log_every_steps)
        try:
            while self.step < stop:
                record = self.train_step()
                if self.metrics is not None:
                    self.metrics.write(record)
                if progress is not None:
                    progress.update(record)
                abort = self.guard.abort_message()
                if abort:
                    raise GuardAbort(abort)
                if record["guard"] == ROLLED_BACK:
                    # Keep the skip of the data window across a later resume too: the restored step
                    # is saved again with the cursor past the window.
                    self._save()
                    last_saved = self.step
                elif every_ckpt and self.step % every_ckpt == 0:
                    self._save()
                    last_saved = self.step
                if self._stop_ranks:
                    if last_saved != self.step:
                        self._save()
                    received = ", ".join(f"rank {r}: {signal_name(s)}" for r, s in sorted(self._stop_ranks.items()))
                    self.log.info("preempted (%s): saved step %d, exiting with %d for a requeue; resume=auto "
                                     "continues from here", received, self.step, PREEMPTED_EXIT_CODE)
                    return PREEMPTED_EXIT_CODE
                if (every_eval and cfg.data.eval_path and self.step % every_eval == 0
                        and record["guard"] != ROLLED_BACK):
                    self.run_eval()
        finally:
            if progress is not None:
                progress.close()
        if last_saved != self.step:
            self._save()
        finished = self.step == cfg.train.max_steps
        if finished and cfg.data.eval_path and not (every_eval and self.step % every_eval == 0):
            self.run_eval()
        return 0

    def _save(self) -> None:
        self._rollback_path = self.save_checkpoint()
        self._window_sample_ids, self._window_samples = [], 0

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches.

        The step's numbers are summed over ranks once, between the last forward and its backward,
        so every rank knows the guard's decision and any stop signal before the update; a discarded
        update goes through DeepSpeed's own path for a non-finite gradient norm.
        """
        cfg, engine = self.cfg, self.engine
        device, rank = self.dist.device, self.dist.rank
        accum = self.batch_sizes["grad_accum_steps"]
        step = self.step + 1
        # The rate this step's update uses (of `optim.lr`; groups in optim.group_lr scale alike).
        lr = cfg.optim.lr * lr_multiplier(self.step, cfg.optim, cfg.train.max_steps)
        fault = self.faults.take(step, rank)
        discarded_before = engine.skipped_steps
        start = time.perf_counter()
        data_wait_s = 0.0
        sums = torch.zeros(len(_STEP_SUMS), dtype=torch.float64)
        nonfinite = False
        sample_ids: List[str] = []
        for micro in range(accum):
            wait_start = time.perf_counter()
            batch = next(self.data_iter)
            data_wait_s += time.perf_counter() - wait_start
            meta = batch["meta"]
            sample_ids.extend(meta["sample_ids"])
            out = engine(**model_inputs(batch, device), z_loss_weight=cfg.train.z_loss_weight)
            loss = out.loss if fault is None else fault.apply(out.loss)
            # One device-to-host copy (one sync) for the three losses, not one each.
            loss_value, ce_value, z_value = torch.stack([loss, out.ce_loss, out.z_loss]).detach().tolist()
            nonfinite = nonfinite or not math.isfinite(loss_value)
            num_images = float(batch["num_images"].sum()) if "num_images" in batch else 0.0
            sums += torch.tensor([loss_value, ce_value, z_value,
                                  float(batch["attention_mask"].sum()), float(len(meta["sample_ids"])),
                                  meta["packing_efficiency"], num_images, float(batch["attention_mask"].shape[0])],
                                 dtype=torch.float64)
            if micro == accum - 1:
                stats = self._reduce_step(sums, nonfinite, data_wait_s, meta["skipped"])
                planned = self.guard.judge(step, stats["loss"], stats["nonfinite_ranks"])
                if planned.discards_update:
                    # A NaN loss makes a NaN gradient norm, and on that DeepSpeed discards the update on
                    # every rank: gradients dropped, optimizer state and scheduler untouched.
                    loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        step_time_s = time.perf_counter() - start
        self.step = step
        discarded = engine.skipped_steps - discarded_before
        verdict = self.guard.settle(step, planned, discarded == 1, stats["loss"], self._rollback_path is not None)
        if discarded and engine.lr_scheduler is not None:
            # DeepSpeed leaves the schedule where it was on a discarded update; here it follows the
            # steps taken (data consumed), as the logged `lr` and train.max_steps do.
            engine.lr_scheduler.step()
        grad_norm = engine.get_global_grad_norm()
        record: Dict[str, Any] = {
            "step": step,
            "loss": stats["loss"],
            "ce_loss": stats["ce_loss"],
            "z_loss": stats["z_loss"],
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None and not discarded else None,
            "tokens": stats["tokens"],
            "samples": stats["samples"],
            "images": stats["images"],
            "step_time_s": step_time_s,
            "tokens_per_s": stats["tokens"] / step_time_s,
            "samples_per_s": stats["samples"] / step_time_s,
            "packing_efficiency": stats["packing_efficiency"],
            "data_wait_s": stats["data_wait_s"],
            "max_rss_gib": stats["max_rss_gib"],
        }
        if device.type == "cuda":
            record["max_mem_gib"] = stats["max_gpu_mem_gib"]
        record["model_flops"] = self._model_flops(stats["tokens"], stats["images"], stats["rows"])
        record["model_tflops_per_s"] = record["model_flops"] / step_time_s / 1e12
        record["mfu"] = self._mfu(record["model_flops"], step_time_s)
        record.update(self._settle_guard(step, verdict, sample_ids, stats["samples"]))
        self._data_skip_counts(stats["skipped_total"])
        skipped = {**self._data_skipped, **self._guard_skipped}
        record["skipped_samples"] = skipped
        record["skipped_samples_step"] = {k: v - self._skipped_before.get(k, 0) for k, v in skipped.items()
                                          if v != self._skipped_before.get(k, 0)}
        self._skipped_before = skipped
        return record

    def _reduce_step(self, sums: torch.Tensor, nonfinite: bool, data_wait_s: float,
                     skipped: Dict[str, int]) -> Dict[str, Any]:
        """The step's one collective of its own: a sum of the step's totals and of a table with one
        row per rank, each rank filling its own (flags, stop signal, data wait, memory peaks, broken
        samples), so maxima and the ranks behind a flag come out of the same sum."""
        world, rank = self.dist.world_size, self.dist.rank
        table = torch.zeros(world, len(_RANK_ROW), dtype=torch.float64)
        rss_gib, gpu_gib = max_memory_gib()
        table[rank] = torch.tensor([float(nonfinite), float(self.stop_signals.received or 0), data_wait_s,
                                    rss_gib, gpu_gib, float(sum(skipped.values()))], dtype=torch.float64)
        device = self.dist.device if self.dist.device.type == "cuda" else torch.device("cpu")
        total = distributed.all_reduce_sum(torch.cat([sums, table.flatten()]).to(device)).cpu()
        sums, table = total[:len(_STEP_SUMS)], total[len(_STEP_SUMS):].view(world, len(_RANK_ROW))
        micro_steps = self.batch_sizes["grad_accum_steps"] * world
        col = {name: table[:, i] for i, name in enumerate(_RANK_ROW)}
        self._stop_ranks = {r: int(s) for r, s in enumerate(col["signal"].tolist()) if s}
        return {
            "loss": float(sums[0] / micro_steps),
            "ce_loss": float(sums[1] / micro_steps),
            "z_loss": float(sums[2] / micro_steps),
            "tokens": int(sums[3]),
            "samples": int(sums[4]),
            "packing_efficiency": float(sums[5] / micro_steps),
            "images": int(sums[6]),
            "rows": int(sums[7]),
            "nonfinite_ranks": [r for r, flag in enumerate(col["nonfinite"].tolist()) if flag],
            "data_wait_s": float(col["data_wait_s"].max()),
            "max_rss_gib": float(col["max_rss_gib"].max()),
            "max_gpu_mem_gib": float(col["max_gpu_mem_gib"].max()),
            "skipped_total": int(col["skipped"].sum()),
        }

    def _settle_guard(self, step: int, verdict: Verdict, sample_ids: List[str], samples: int) -> Dict[str, Any]:
        """Book-keeping after the guard's final decision (the same on every rank): skip counts,
        the rollback, and the guards.jsonl event with the sample ids whose update was discarded."""
        fields: Dict[str, Any] = {"guard": verdict.decision}
        self._window_sample_ids.extend(sample_ids)
        if verdict.decision == OK:
            self._window_samples += samples
        else:
            fields["guard_reason"] = verdict.reason
            lost_ids = self._window_sample_ids if verdict.decision == ROLLED_BACK else sample_ids
            lost = samples + (self._window_samples if verdict.decision == ROLLED_BACK else 0)
            self._guard_skipped[SKIP_REASONS[verdict.decision]] += lost
            event = {"step": step, "guard": verdict.decision, "reason": verdict.reason, "samples": lost,
                     "sample_ids": self._gather_ids(lost_ids)}
            if verdict.decision == ROLLED_BACK:
                fields["rolled_back_to_step"] = event["rolled_back_to_step"] = self._roll_back()
            if self.metrics is not None:
                self.metrics.write_guard_event(event)
        fields["guard_counts"] = {d: self.guard.counts[d] for d in DECISIONS if d != OK}
        return fields

    def _roll_back(self) -> int:
        """Restore the last complete checkpoint, then move the data cursor past the window (the
        micro-batches from that checkpoint to the bad step, inclusive) so they do not come back."""
        past_window = self.loader.state_dict()
        self._restore(self._rollback_path)
        self.loader.load_state_dict(past_window)
        self.data_iter = iter(self.loader)
        self.guard.forget_after(self.step)
        self._window_sample_ids, self._window_samples = [], 0
        self.log.info("rolled back to %s (step %d); the data since it is skipped", self._rollback_path, self.step)
        return self.step

    def _gather_ids(self, ids: List[str]) -> List[str]:
        if self.dist.world_size == 1:
            return list(ids)
        gathered: List[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, list(ids))
        return [i for part in gathered for i in part]

    def _data_skip_counts(self, total: Optional[int] = None) -> None:
        """Broken samples skipped by the data pipeline, over all ranks by reason; gathered only when
        the total (known to every rank from the step's sum) changed, as an object gather is slow."""
        if total == self._data_skipped_total:
            return
        counts = self.loader.skipped
        if self.dist.world_size > 1:
            gathered: List[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, dict(counts))
            merged: Counter = Counter()
            for part in gathered:
                merged.update(part)
            counts = dict(merged)
        self._data_skipped = dict(sorted(counts.items()))
        self._data_skipped_total = sum(self._data_skipped.values())

    def _model_flops(self, tokens: int, images: int, rows: int) -> float:
        """Frozen-aware model FLOPs of a step (mmtrain.engine.flops): parameter counts from the group
        table, the shape from the model's config (its decoder, and its vision tower if it has one)."""
        text = [r for g, r in self.group_table.items() if g != "vision"]
        vision = self.group_table.get("vision", {"num_params": 0, "num_trainable": 0})
        return train_step_flops(
            num_tokens=tokens,
            trainable_params=sum(r["num_trainable"] for r in text),
            frozen_params=sum(r["num_params"] - r["num_trainable"] for r in text),
            seq_tokens=tokens / max(1, rows),
            num_images=images,
            trainable_vision_params=vision["num_trainable"],
            frozen_vision_params=vision["num_params"] - vision["num_trainable"],
            **model_shape(self.model.config),
        )

    def _mfu(self, model_flops: float, step_time_s: float) -> Optional[float]:
        """Frozen-aware MFU over every rank's chip; None where the chip's dense bf16 peak is unknown (CPU)."""
        peak = peak_tflops()
        return None if peak is None else mfu(model_flops, step_time_s, peak, self.dist.world_size)

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
