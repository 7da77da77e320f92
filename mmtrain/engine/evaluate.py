"""Greedy answer generation and exact-match accuracy, on one process or on all ranks of a run.

Under ZeRO-3 every forward is a collective (parameters are gathered from all ranks), so every rank
must run the same number of forwards: ranks split the samples, pad their share to equal length,
and keep generating until every rank's current answer has finished.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch

from mmtrain.engine import distributed

Prompt = Tuple[str, torch.Tensor, torch.Tensor, str]  # sample id, ids [1, T], images [1, N, 3, H, W], answer


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .!?,;:\"'")


def _greedy(forward: Callable, ids: torch.Tensor, images: torch.Tensor, max_new_tokens: int,
            stop_ids: Sequence[int], synced: bool, device: torch.device) -> List[int]:
    out: List[int] = []
    finished = False
    for _ in range(max_new_tokens):
        # NOTE: no KV cache: answers are a few tokens; a cache comes with real-size generation.
        logits = forward(ids, images)
        next_id = int(logits[0, -1].float().argmax())
        if not finished:
            if next_id in stop_ids:
                finished = True
            else:
                out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=ids.device)], dim=1)
        if synced:
            flag = torch.tensor([0.0 if finished else 1.0], device=device)
            if distributed.all_reduce_sum(flag).item() == 0:
                break
        elif finished:
            break
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    prompts: Iterable[Prompt],
    tokenizer,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_examples: int = 5,
) -> Dict:
    """Exact-match accuracy of greedy answers. Collective when world_size > 1."""
    was_training = model.training
    model.eval()
    prompts = list(prompts)
    mine = prompts[rank::world_size]
    rounds = -(-len(prompts) // world_size)

    def forward(ids, images):
        return model(input_ids=ids.to(device), images=images.to(device)).logits

    correct, counted, examples = 0, 0, []
    for i in range(rounds):
        real = i < len(mine)
        sample_id, ids, images, answer = mine[i] if real else prompts[0]  # padding round: not counted
        new_ids = _greedy(forward, ids.to(device), images, max_new_tokens, stop_ids, world_size > 1, device)
        if not real:
            continue
        prediction = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        hit = normalize_answer(prediction) == normalize_answer(answer)
        correct += int(hit)
        counted += 1
        if len(examples) < num_examples:
            examples.append({"id": sample_id, "prediction": prediction, "answer": answer, "correct": hit})
    totals = distributed.all_reduce_sum(torch.tensor([float(correct), float(counted)], device=device)).tolist()
    model.train(was_training)
    return {
        "accuracy": totals[0] / max(1.0, totals[1]),
        "num_samples": int(totals[1]),
        "examples": examples,
    }
