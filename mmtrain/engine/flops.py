"""Model FLOPs of one training step, frozen-aware (DESIGN.md, Performance accounting).

Plain numbers in, FLOPs out, so the trainer's MFU and the bench/ scripts count alike:

    text path      6 per trainable parameter per token (forward 2, backward 4: input and weight
                   gradients), 4 per frozen one (forward 2, input gradients 2: the gradient still
                   flows through a frozen decoder to the trainable blocks below it, but no weight
                   gradient is formed)
    attention      QKᵀ and AV: 4·s·d per token per layer forward, 3x that with the backward,
                   counted over the full sequence as PaLM does (the causal mask is not halved)
    vision tower   forward only when frozen: 2 per parameter per patch, plus its attention over
                   the image's patches; 6 and 3x when it trains

Activation-checkpoint recompute never counts: it is work the hardware does, not the model.
Embedding tables count like matrices (a lookup is no multiply): about 2% over on 7B decoders.
"""

from __future__ import annotations


def train_step_flops(
    *,
    num_tokens: float,
    trainable_params: float,
    frozen_params: float,
    seq_tokens: float,
    num_layers: int,
    hidden_size: int,
    num_images: float = 0,
    patches_per_image: float = 0,
    trainable_vision_params: float = 0,
    frozen_vision_params: float = 0,
    vision_layers: int = 0,
    vision_hidden_size: int = 0,
) -> float:
    """FLOPs of one optimizer step.

    num_tokens: tokens processed in the step (all ranks, all micro-batches; padding excluded).
    trainable_params / frozen_params: parameters every text token passes through (decoder,
        cross-attention, embeddings, head), outside the vision tower.
    seq_tokens: sequence length the attention spans (mean tokens per row).
    num_layers / hidden_size: the decoder's attention layers and width.
    num_images / patches_per_image: images encoded in the step and the tokens the tower sees per image.
    trainable_vision_params / frozen_vision_params: the vision tower's parameters.
    vision_layers / vision_hidden_size: the tower's attention layers and width.
    """
    text = (6 * trainable_params + 4 * frozen_params) * num_tokens
    attention = 3 * 4 * num_layers * hidden_size * seq_tokens * num_tokens
    vision_tokens = num_images * patches_per_image
    vision_trains = trainable_vision_params > 0
    vision = (6 * trainable_vision_params + 2 * frozen_vision_params) * vision_tokens
    vision_attention = (3 if vision_trains else 1) * 4 * vision_layers * vision_hidden_size * patches_per_image * vision_tokens
    return float(text + attention + vision + vision_attention)


def model_shape(config) -> dict:
    """The shape arguments of train_step_flops read from a model config: the decoder's layers and
    width, and the vision tower's tokens per image, layers and width (zeros without a tower, as
    Fuyu's patch projection is counted with the decoder's parameters). IDEFICS' tower keeps the CLS
    token (idefics_clip), the others drop it."""
    tower = getattr(config, "vision", None)
    shape = {"num_layers": config.decoder.num_hidden_layers, "hidden_size": config.decoder.hidden_size,
             "patches_per_image": 0, "vision_layers": 0, "vision_hidden_size": 0}
    if tower is not None:
        shape.update(patches_per_image=tower.num_patches + int(tower.tower == "idefics_clip"),
                     vision_layers=tower.num_layers, vision_hidden_size=tower.width)
    return shape


def mfu(flops_per_step: float, step_time_s: float, peak_tflops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' dense bf16 peak."""
    return flops_per_step / step_time_s / (peak_tflops_per_device * 1e12 * num_devices)
