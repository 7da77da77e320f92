"""Metrics without a run: the frozen-aware FLOPs on hand-computed numbers, the trainer's MFU inputs
from a model's group table, metrics.jsonl and TensorBoard records, and the console: a tqdm bar on
a terminal (a pty), plain step lines otherwise."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from types import SimpleNamespace

import pytest

from mmtrain.engine.flops import mfu, train_step_flops


def test_train_step_flops_by_hand():
    common = dict(num_tokens=1000, trainable_params=10, frozen_params=100, seq_tokens=50, num_layers=2,
                  hidden_size=8, num_images=3, patches_per_image=4, vision_layers=1, vision_hidden_size=6)
    # text (6*10 + 4*100)*1000 = 460,000; decoder attention 3*4*2*8*50*1000 = 9,600,000;
    # frozen tower forward 2*20*(3*4) = 480 and its attention 4*1*6*4*(3*4) = 1,152.
    assert train_step_flops(**common, frozen_vision_params=20) == 460_000 + 9_600_000 + 480 + 1_152
    # A tower that trains (5 of its 20 parameters): 6*5*12 + 2*15*12 = 720, attention three times 1,152.
    assert train_step_flops(**common, trainable_vision_params=5, frozen_vision_params=15) == \
        460_000 + 9_600_000 + 720 + 3 * 1_152
    # Without images (Fuyu: patches are tokens of the decoder) only the text terms remain.
    assert train_step_flops(num_tokens=10, trainable_params=1, frozen_params=0, seq_tokens=5,
                            num_layers=1, hidden_size=2) == 60 + 3 * 4 * 1 * 2 * 5 * 10
    assert mfu(989e12, 1.0, 989.0, 1) == pytest.approx(1.0)
    assert mfu(989e12, 2.0, 989.0, 2) == pytest.approx(0.25)


def test_trainer_counts_frozen_groups_and_the_vision_tower_apart():
    from mmtrain.engine.trainer import Trainer
    from mmtrain.models.registry import get_spec

    config = get_spec("otter-tiny").config
    trainer = Trainer.__new__(Trainer)
    trainer.model = SimpleNamespace(config=config)
    trainer.group_table = {
        "vision": {"num_params": 1000, "num_trainable": 0},
        "perceiver": {"num_params": 50, "num_trainable": 50},
        "decoder": {"num_params": 400, "num_trainable": 0},
    }
    patches = (config.vision.image_size_px // config.vision.patch_size_px) ** 2  # open_clip: no CLS token
    expected = train_step_flops(
        num_tokens=600, trainable_params=50, frozen_params=400, seq_tokens=600 / 8,
        num_layers=config.decoder.num_hidden_layers, hidden_size=config.decoder.hidden_size,
        num_images=5, patches_per_image=patches, frozen_vision_params=1000,
        vision_layers=config.vision.num_layers, vision_hidden_size=config.vision.width)
    assert trainer._model_flops(tokens=600, images=5, rows=8) == expected
    # The frozen tower costs 2 FLOPs per parameter per patch: its forward only.
    no_images = trainer._model_flops(tokens=600, images=0, rows=8)
    assert expected - no_images > 2 * 1000 * 5 * patches


def test_metrics_jsonl_writes_nonfinite_as_null_and_tensorboard_gets_every_number(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmtrain.engine.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": None, "samples_per_s": 12.5, "guard": "skipped_nonfinite",
                  "skipped_samples": {"bad_image": 2, "guard_nonfinite": 8}, "max_rss_gib": 0.5})
    writer.write_guard_event({"step": 1, "guard": "skipped_nonfinite", "sample_ids": ["a", "b"]})
    writer.close()
    row = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert row["loss"] is None and row["guard"] == "skipped_nonfinite"
    assert json.loads(open(tmp_path / "guards.jsonl").read())["sample_ids"] == ["a", "b"]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/samples_per_s", "train/max_rss_gib", "train/skipped_samples/bad_image",
            "train/skipped_samples/guard_nonfinite"} <= tags and "train/loss" not in tags


PROGRESS_SCRIPT = """
import sys
from mmtrain.engine.metrics import ProgressReporter, setup_logging
log = setup_logging(sys.argv[1], 0)
progress = ProgressReporter(log, max_steps=3, initial_step=0, log_every_steps=1)
for step in (1, 2, 3):
    progress.update({"step": step, "loss": 2.0 / step, "z_loss": 30.0, "lr": 1e-3, "grad_norm": 1.5,
                     "tokens_per_s": 100.0, "samples_per_s": 4.0, "data_wait_s": 0.01,
                     "guard": "ok" if step != 2 else "skipped_spike", "guard_reason": "loss 9 > 5 x running mean 1"})
progress.close()
log.info("done")
"""


def _run_progress(tmp_path, use_pty):
    cmd = [sys.executable, "-c", PROGRESS_SCRIPT, str(tmp_path)]
    if not use_pty:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    controller, terminal = pty.openpty()
    # A terminal 120 columns wide (a fresh pty reports 0 x 0, which no real terminal does).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path):
    plain = _run_progress(tmp_path, use_pty=False)
    lines = [line for line in plain.splitlines() if " step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "guard skipped_spike: loss 9 > 5 x running mean 1" in lines[1] and "\r" not in plain
    os.remove(tmp_path / "train.log")

    terminal = _run_progress(tmp_path, use_pty=True)
    assert "3/3" in terminal and "step/s" in terminal and "\r" in terminal  # tqdm's bar, redrawn in place
    assert "INFO step 1/3" not in terminal  # the bar carries the numbers; step lines go to train.log
    assert "INFO step 2/3" in terminal  # a guard's decision still prints
    log = open(tmp_path / "train.log").read()
    assert "step 1/3 loss 2.0000" in log and "step 3/3" in log and "done" in log
