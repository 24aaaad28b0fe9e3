"""Random but well-formed Batches for model tests, benchmarks and FLOP checks (no data pipeline).

Half the samples are "robot/arm" (embodiment 0: all cameras, full action dims), half "human/ego"
(embodiment 1: wrist cameras missing, the gripper dim unsupervised), mirroring the mixed batches the
paper trains on. Every padded position holds garbage (not zeros), so a mask bug shows up.
"""
from __future__ import annotations

import torch

from megavla.batch import Batch
from megavla.config.model import ModelConfig

from .presets import resolve

ROBOT, HUMAN = 0, 1


def random_batch(cfg: ModelConfig, batch_size: int = 4, num_cameras: int = 2, text_len: int = 6,
                 subtask_len: int = 5, fast_len: int = 8, action_dims: int = 7, state_dims: int = 8,
                 gripper_dim: int = 6, seed: int = 0) -> Batch:
    cfg = resolve(cfg)
    g = torch.Generator().manual_seed(seed)
    b, h, a, s, r = batch_size, cfg.chunk_length, cfg.action_dim, cfg.state_dim, cfg.image_size
    if action_dims > a or state_dims > s or gripper_dim >= action_dims:
        raise ValueError(f"random_batch: action_dims={action_dims} <= model.action_dim={a}, state_dims="
                         f"{state_dims} <= model.state_dim={s}, gripper_dim < action_dims required")
    embodiment = torch.tensor([ROBOT if i % 2 == 0 else HUMAN for i in range(b)])
    human = embodiment == HUMAN

    def lengths(max_len: int) -> torch.Tensor:
        return torch.randint(max(1, max_len // 2), max_len + 1, (b,), generator=g)

    def prefix_mask(lens: torch.Tensor, max_len: int) -> torch.Tensor:
        return torch.arange(max_len)[None, :] < lens[:, None]

    image_mask = torch.ones(b, num_cameras, dtype=torch.bool)
    image_mask[human, 1:] = False  # human video: head camera only
    text_mask = prefix_mask(lengths(text_len), text_len)
    subtask_mask = prefix_mask(lengths(subtask_len), subtask_len)
    fast_mask = prefix_mask(lengths(fast_len), fast_len)
    state_mask = torch.zeros(b, s, dtype=torch.bool)
    state_mask[:, :state_dims] = True
    dim_mask = torch.zeros(b, a, dtype=torch.bool)
    dim_mask[:, :action_dims] = True
    dim_mask[human, gripper_dim] = False
    time_mask = torch.ones(b, h, dtype=torch.bool)
    time_mask[-1, h // 2:] = False  # one chunk runs past its episode's end

    def garbage_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.full_like(x, 7.0))

    actions = torch.rand(b, h, a, generator=g) * 2 - 1
    actions = garbage_where(actions, dim_mask[:, None, :] & time_mask[:, :, None])
    state = garbage_where(torch.rand(b, s, generator=g) * 2 - 1, state_mask)
    # drawn in the order the fields are listed (seeded batches stay what they were)
    images = torch.randint(0, 256, (b, num_cameras, 3, r, r), dtype=torch.uint8, generator=g)
    text = torch.randint(0, cfg.text_vocab_size, (b, text_len), generator=g)
    fast = torch.randint(0, cfg.fast_vocab_size, (b, fast_len), generator=g)
    subtask = torch.randint(0, cfg.text_vocab_size, (b, subtask_len), generator=g)
    # like the pipeline's: a subtask ends in the text EOS and holds no earlier one (inference stops there)
    eos = cfg.subtask_eos_id
    subtask = torch.where(subtask == eos, torch.full_like(subtask, (eos + 1) % cfg.text_vocab_size), subtask)
    last = subtask_mask.long().sum(dim=1, keepdim=True) - 1
    subtask = subtask.scatter(1, last, torch.full_like(last, eos))
    return Batch(
        images=images,
        image_mask=image_mask,
        text_tokens=text,
        text_mask=text_mask,
        state=state, state_mask=state_mask,
        actions=actions, action_dim_mask=dim_mask, action_time_mask=time_mask,
        fast_tokens=fast,
        fast_mask=fast_mask,
        subtask_tokens=subtask,
        subtask_mask=subtask_mask,
        embodiment=embodiment,
        meta={"source": ["robot" if e == ROBOT else "human" for e in embodiment.tolist()]},
    )
