"""The three objectives' pieces: flow matching, FAST cross-entropy, subtask cross-entropy.

Flow matching (pi0 convention, t = 1 is noise): t ~ Beta(1.5, 1) * 0.999 + 0.001,
x_t = t * eps + (1 - t) * a, target u = eps - a; per-sample MSE over the supervised elements
(action_dim_mask x action_time_mask, via megavla.kernels.flow_matching_loss), averaged over samples
with at least one supervised element. Unsupervised action entries (a human's gripper, padded dims,
steps past the episode end) are zeroed *before* noising, so garbage there reaches neither the
loss nor the model's input. Cross-entropies average over valid target tokens of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megavla.batch import MAX_EMBODIMENTS, Batch
from megavla.data_shards.embodiments import EMBODIMENT_IDS
from megavla.kernels import flow_matching_loss, flow_noise, mean_over_supervised_samples

TIME_BETA_ALPHA, TIME_BETA_BETA = 1.5, 1.0


def check_batch(model, batch: Batch) -> None:
    """Shapes and id ranges the model relies on, with the config field to fix.

    The id-range check reads token ids on the host: free for a CPU batch (numpy), a device sync for a
    GPU batch, so a model checks the ids of its first device batch only (a vocabulary mismatch
    between config and tokenizer shows there; the trainer's hot path stays free of syncs)."""
    cfg = model.cfg
    b, h, a = batch.actions.shape
    if h != cfg.chunk_length or a != cfg.action_dim:
        raise ValueError(f"batch.actions is [B, {h}, {a}] but the model has model.chunk_length="
                         f"{cfg.chunk_length}, model.action_dim={cfg.action_dim}; make them equal to "
                         f"data.chunk_length / data.max_action_dim")
    if batch.state.shape[1] != cfg.state_dim:
        raise ValueError(f"batch.state has {batch.state.shape[1]} dims but model.state_dim={cfg.state_dim}; "
                         f"make it equal to data.max_state_dim")
    on_host = batch.text_tokens.device.type == "cpu"
    if not on_host:
        if getattr(model, "_device_ids_checked", False):
            return
        model._device_ids_checked = True
    for name, ids, mask, limit, field in (
            ("text_tokens", batch.text_tokens, batch.text_mask, cfg.text_vocab_size, "text_vocab_size"),
            ("subtask_tokens", batch.subtask_tokens, batch.subtask_mask, cfg.text_vocab_size, "text_vocab_size"),
            ("fast_tokens", batch.fast_tokens, batch.fast_mask, cfg.fast_vocab_size, "fast_vocab_size")):
        if not ids.numel():
            continue
        valid = (ids.numpy() if on_host else ids.cpu().numpy())[(mask.numpy() if on_host else mask.cpu().numpy())]
        if valid.size and (valid.min() < 0 or valid.max() >= limit):
            bad = int(valid.max()) if valid.max() >= limit else int(valid.min())
            raise ValueError(f"batch.{name} holds id {bad} outside [0, {limit}); set model.{field} to "
                             f"the tokenizer's vocab_size (>= {bad + 1})")


def clean_actions(batch: Batch) -> torch.Tensor:
    """actions with every unsupervised entry set to 0 (where(), so NaN garbage is removed too)."""
    mask = batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None]
    return torch.where(mask, batch.actions, torch.zeros((), dtype=batch.actions.dtype, device=mask.device))


def sample_time(batch_size: int, device: torch.device) -> torch.Tensor:
    # validate_args=False: the argument check reads the (constant) parameters on the host, a device
    # sync every forward
    beta = torch.distributions.Beta(torch.tensor(TIME_BETA_ALPHA, device=device),
                                    torch.tensor(TIME_BETA_BETA, device=device), validate_args=False)
    return beta.sample((batch_size,)) * 0.999 + 0.001


def noisy_actions(actions: torch.Tensor, noise: torch.Tensor | None, time: torch.Tensor | None, impl: str):
    """-> (t [B], eps [B, H, A], x_t [B, H, A]); noise / time drawn when not given."""
    t = sample_time(actions.shape[0], actions.device) if time is None else time.to(actions.device)
    eps = torch.randn_like(actions) if noise is None else noise.to(actions)
    return t, eps, flow_noise(actions, eps, t, impl=impl)


def flow_supervised(batch: Batch) -> torch.Tensor:
    """float [B]: 1 for samples with at least one supervised action element."""
    return (batch.action_dim_mask.any(dim=1) & batch.action_time_mask.any(dim=1)).float()


def flow_loss(v: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor, batch: Batch, impl: str):
    """-> (batch flow loss, per-sample losses [B]); actions must be `clean_actions(batch)`."""
    per_sample = flow_matching_loss(v, actions.to(v.dtype), noise.to(v.dtype), batch.action_dim_mask,
                                    batch.action_time_mask, impl=impl)
    return mean_over_supervised_samples(per_sample, batch.action_dim_mask, batch.action_time_mask), per_sample


def token_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """Mean CE over valid tokens -> (mean, per-sample CE sum [B], per-sample count [B])."""
    b, length, vocab = logits.shape
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    ce = F.cross_entropy(logits.float().reshape(b * length, vocab), safe.reshape(-1), reduction="none")
    ce = torch.where(mask, ce.view(b, length), torch.zeros((), device=ce.device))
    per_sum, count = ce.sum(dim=1), mask.sum(dim=1).float()
    return per_sum.sum() / count.sum().clamp_min(1.0), per_sum, count


def log_per_embodiment(out: dict, name: str, value: torch.Tensor, numer: torch.Tensor,
                       denom: torch.Tensor, batch: Batch, summed: bool = False) -> None:
    """out[name] = value (detached); out[f"{name}/by_embodiment"] = float [2, MAX_EMBODIMENTS]: row 0 the
    sum of numer, row 1 the sum of denom per embodiment id (the trainer logs
    "{name}/{embodiment_tag(id)}" = row 0 / row 1 where row 1 > 0). For the flow loss numer =
    per-sample loss and denom = supervised flags (numer is masked here). Fixed-size sums on the
    device: no host sync to find the ids present."""
    out[name] = value.detach()
    numer, denom = numer.detach(), denom.detach().to(numer.dtype)
    if not summed:
        numer = numer * denom
    sums = torch.zeros(2, MAX_EMBODIMENTS, dtype=numer.dtype, device=numer.device)
    sums[0].index_add_(0, batch.embodiment, numer)
    sums[1].index_add_(0, batch.embodiment, denom)
    out[f"{name}/by_embodiment"] = sums


def embodiment_tag(embodiment_id: int) -> str:
    """Metric tag of an embodiment id: "robot_arm" for robot/arm (data_shards/embodiments.py), so logs
    say flow/robot_arm rather than flow/0; an id without a name stays a number."""
    return _EMBODIMENT_TAGS.get(int(embodiment_id), str(embodiment_id))


_EMBODIMENT_TAGS = {i: name.replace("/", "_") for name, i in EMBODIMENT_IDS.items()}
assert max(EMBODIMENT_IDS.values()) < MAX_EMBODIMENTS, "raise megavla.batch.MAX_EMBODIMENTS"
