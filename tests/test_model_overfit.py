"""The tiny VLA fits one fixed mixed robot + human batch; then inference reproduces it."""
import logging

import torch

from megavla.batch import Batch
from megavla.config.model import ModelConfig
from megavla.model.losses import clean_actions
from megavla.model.synthetic import random_batch
from megavla.model.vla import build_model

logger = logging.getLogger(__name__)
STEPS, LR, REPEATS, EVAL_DRAWS = 250, 6e-3, 6, 16


def test_tiny_model_overfits_a_mixed_batch_and_inference_reproduces_it():
    torch.manual_seed(0)
    # tiny preset, trimmed further so 250 steps fit in the CPU test budget (4 patches per camera,
    # 256-token vocabularies) and with a 64-wide expert so the flow field is learnt in that time
    cfg = ModelConfig(preset="tiny", kernels="torch", action_dim=8, state_dim=8, patch_size=16,
                      text_vocab_size=256, fast_vocab_size=256, expert_width=64, expert_mlp_dim=128)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    batch = random_batch(cfg, batch_size=4, action_dims=6, state_dims=5, gripper_dim=5, seed=0)
    assert set(batch.embodiment.tolist()) == {0, 1}
    # the same 4 samples repeated: each step sees 6 (t, noise) draws per sample
    train_batch = Batch(**{k: v.repeat(REPEATS, *([1] * (v.dim() - 1))) for k, v in batch.tensors().items()})

    g = torch.Generator().manual_seed(1)
    eval_noise = torch.randn((EVAL_DRAWS, *batch.actions.shape), generator=g)
    eval_time = torch.distributions.Beta(1.5, 1.0).sample((EVAL_DRAWS, batch.batch_size)) * 0.999 + 0.001

    def eval_flow() -> float:
        with torch.no_grad():
            return sum(float(model(batch, eval_noise[k], eval_time[k])["flow"]) for k in range(EVAL_DRAWS)) / EVAL_DRAWS

    first = eval_flow()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    model.train()
    for _ in range(STEPS):
        loss = model(train_batch)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    last = eval_flow()

    torch.manual_seed(5)
    sampled = model.sample_actions(batch, num_steps=10)
    supervised = batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None]
    mse = float(((sampled - clean_actions(batch))[supervised] ** 2).mean())
    baseline = float((clean_actions(batch)[supervised] ** 2).mean())  # predicting zeros
    ids, mask = model.predict_subtask(batch, max_len=batch.subtask_tokens.shape[1])
    subtask_acc = float((ids == batch.subtask_tokens)[batch.subtask_mask].float().mean())
    fast_ids, _ = model.predict_fast(batch, max_len=batch.fast_tokens.shape[1])
    fast_acc = float((fast_ids == batch.fast_tokens)[batch.fast_mask].float().mean())
    logger.info("overfit: flow %.4f -> %.4f (%.1fx), sample_actions MSE %.4f (zeros: %.3f), "
                "subtask token accuracy %.3f, FAST token accuracy %.3f", first, last, first / last, mse, baseline,
                subtask_acc, fast_acc)
    assert first / last >= 20.0
    assert mse < 0.1 * baseline
    assert subtask_acc == 1.0 and fast_acc == 1.0
