"""distill.py: guidance losses of GTR-Turbo (placeholder, being written)."""
import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of `tokens` under `logits` with next-token alignment.

    logits: [B, T, V] from a causal LM over the sequence `tokens` [B, T]. Position t of the logits
    predicts token t+1, so the result is [B, T-1]: out[:, t] = log softmax(logits[:, t] / T)[tokens[:, t+1]].
    """
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
