"""distill.py: the guidance terms of GTR-Turbo, as tensor functions on padded batches.

Implements:
- `token_logprobs`: per-token log-probs with next-token alignment (shared with agent.py);
- `reverse_kl_penalty`: docs/method.md 4.2, the per-turn KL penalty of the KL variant,
  mean over the agent's own thought tokens of clip(log pi_agent - log pi_teacher, 0, 10);
  the estimators k1 / abs / k3 / clip for the ablations;
- `exact_reverse_kl` / `forward_kl`: full-vocabulary KL per token (ablations of 4.2);
- `sft_loss`: 3 / 4.3, token-mean cross-entropy on thought tokens only (GTR and the SFT variant).

Sign convention: d = log pi_agent(token) - log pi_teacher(token) on tokens *sampled by the agent*, so
E_agent[d] = KL(agent || teacher) (reverse KL) and d > 0 where the agent is more confident than the
teacher. The penalty is reward shaping, NOT a loss: train.py subtracts beta * penalty from that turn's
return at rollout time, with no gradient through it (the gradient arrives through the PPO ratio). Pass
detached log-probs; these functions do not detach for you.

Left out: the rollout-time plumbing (which tokens are thoughts, the invalid-format penalty of 100, beta)
lives in agent.py / train.py.
"""
import torch

ESTIMATORS = ("clip", "k1", "abs", "k3")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of `tokens` under `logits` with next-token alignment.

    logits: [B, T, V] from a causal LM over the sequence `tokens` [B, T]. Position t of the logits
    predicts token t+1, so the result is [B, T-1]: out[:, t] = log softmax(logits[:, t] / T)[tokens[:, t+1]].
    """
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, G] values, [B, G] mask -> [B] mean over masked entries; 0 for a row with none.

    `where` rather than multiply: padded positions may hold -inf/nan log-probs, and nan * 0 = nan.
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)
    return total / m.sum(-1).clamp_min(1).to(x.dtype)


def _check_same_shape(**tensors) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


def reverse_kl_penalty(agent_logp: torch.Tensor, teacher_logp: torch.Tensor, thought_mask: torch.Tensor,
                       estimator: str = "clip", lo: float = 0.0, hi: float = 10.0) -> torch.Tensor:
    """Per-turn KL penalty on the agent's sampled thought tokens (docs/method.md 4.2) -> [B].

    agent_logp, teacher_logp: [B, G] log-probs of the same generated tokens (same temperature);
    thought_mask: [B, G] bool/float, true on thought tokens. With d = agent_logp - teacher_logp per token:
      "clip" (default, the paper's): clip(d, lo, hi)    "k1": d (unbiased, can be negative)
      "abs": |d|                                        "k3": (r - 1) - log r, r = exp(-d), never negative
    The result is the mean over thought tokens; a turn with no thought tokens gives 0.
    """
    _check_same_shape(agent_logp=agent_logp, teacher_logp=teacher_logp, thought_mask=thought_mask)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if lo > hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    d = agent_logp.float() - teacher_logp.float()  # [B, G]
    if estimator == "clip":
        per_token = d.clamp(lo, hi)
    elif estimator == "k1":
        per_token = d
    elif estimator == "abs":
        per_token = d.abs()
    else:  # k3 = exp(-d) - 1 + d, with expm1 for accuracy at small d; clamp only absorbs rounding
        per_token = (torch.expm1(-d) + d).clamp_min(0)
    return masked_mean(per_token, thought_mask)  # [B]


def _full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || q) per token over the whole vocabulary, averaged over masked tokens. [B, G, V] x2 -> [B]."""
    if p_logits.shape != q_logits.shape or p_logits.shape[:-1] != mask.shape:
        raise ValueError(f"shapes: p {tuple(p_logits.shape)}, q {tuple(q_logits.shape)}, mask {tuple(mask.shape)}")
    log_p = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    # p = 0 contributes 0 even where log_p or log_q is -inf (0 * inf would be nan)
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), device=p.device))
    kl = terms.sum(-1).clamp_min(0)  # [B, G]; KL >= 0, the clamp only absorbs rounding
    return masked_mean(kl, mask)


def exact_reverse_kl(agent_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KL(agent || teacher) per token, mean over masked (thought) tokens -> [B].

    agent_logits, teacher_logits: [B, G, V] logits at the generated positions (aligned so position g
    predicts generated token g), scaled by 1/temperature before the softmax. Log-probabilities work as
    well (log_softmax leaves them unchanged) if they are already at the wanted temperature and
    temperature=1 is passed. mask: [B, G]. Never negative.
    """
    return _full_kl(agent_logits, teacher_logits, mask, temperature)


def forward_kl(agent_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KL(teacher || agent), same inputs as `exact_reverse_kl` (the 4.2 ablation) -> [B]."""
    return _full_kl(teacher_logits, agent_logits, mask, temperature)


def sft_loss(logits: torch.Tensor, target_ids: torch.Tensor, thought_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on thought tokens only (docs/method.md 3 and 4.3) -> scalar.

    logits: [B, G, V] already aligned, logits[:, g] predicts target_ids[:, g] [B, G]; thought_mask: [B, G].
    Token mean over every thought token of the batch (not a mean of per-row means). Action and padding
    positions are ignored whatever id they hold; a masked position with an id outside [0, V) raises.
    An empty mask gives 0 with the graph intact (backward() works and gives zero gradients).
    """
    if logits.shape[:-1] != target_ids.shape or target_ids.shape != thought_mask.shape:
        raise ValueError(f"shapes: logits {tuple(logits.shape)}, targets {tuple(target_ids.shape)}, "
                         f"mask {tuple(thought_mask.shape)}")
    m = thought_mask.bool()
    safe_ids = torch.where(m, target_ids, torch.zeros_like(target_ids))  # e.g. -100 on action tokens
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, safe_ids.long().unsqueeze(-1)).squeeze(-1)  # [B, G]
    nll = torch.where(m, nll, torch.zeros((), device=nll.device))
    return nll.sum() / m.sum().clamp_min(1)
