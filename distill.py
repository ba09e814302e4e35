"""distill.py: the teacher's guidance (docs/method.md sections 3, 4.2, 4.3, 4.4), on padded batches.

    token_logprobs        per-token log-probs with next-token alignment (shared with agent.py)
    4.2, the KL variant:
      reverse_kl_penalty  mean over the guided tokens of clip(log pi_agent - log pi_teacher, 0, 10);
                          the k1 / abs / k3 estimators of its ablation
      exact_reverse_kl, forward_kl   full-vocabulary KL per token (ablations)
      guide_mask          4.4: the tokens guided, the thoughts (or thought + action, ablation)
      teacher_kl          the frozen teacher scores the agent's sampled tokens -> one penalty per turn
      reverse_kl_loss     ours: the same KL as a per-token loss in every PPO step (--kl-mode loss)
    6, the SFT start, the solver as teacher:
      solver_envs         envs whose solver writes an expert answer each turn
      demo_loss           cross-entropy on whole expert answers (thought, action, EOS)
      tokenizer_corpus    prompts and expert answers of every task: the built tokenizer's training text
    3 and 4.3, SFT on guided thoughts:
      sft_loss            cross-entropy on the guided tokens
      gtr_labels          GTR's privileged corrector relabels the wrong turns (section 3)
      teacher_answers, turbo_sft_labels   the teacher answers itself (section 4.3)
      dagger_loss         the CE on a uniform draw from the DAgger buffer of those labels

Sign convention: d = log pi_agent(token) - log pi_teacher(token) on tokens *sampled by the agent*, so
E_agent[d] = KL(agent || teacher) (reverse KL) and d > 0 where the agent is more confident than the
teacher. The paper's penalty is reward shaping, NOT a loss: train.py subtracts beta * penalty from that turn's
return at rollout time, with no gradient through it (the gradient arrives through the PPO ratio);
`reverse_kl_loss` is our alternative, a loss term (train.py --kl-mode loss). Pass
detached log-probs; these functions do not detach for you. Agents and teachers are agent.Agent objects,
passed in: this file needs torch and env.py, not transformers.

Left out: when guidance runs, beta, the invalid-format penalty of 100 and the DAgger buffer itself live in
train.py.
"""
import json

import torch

from env import TASKS, LockstepEnvs, answer_json, parse_answer

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


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, G] values, [B, G] mask -> scalar mean over every masked entry of the batch (not a mean of row means);
    0 with no masked entry. `where` for the same reason as `masked_mean`."""
    m = mask.bool()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / m.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------
# The KL variant (section 4.2) on the tokens the teacher guides (4.4)


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


def reverse_kl_loss(agent_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    clip: float = 10.0) -> torch.Tensor:
    """--kl-mode loss (ours, not the paper's): KL(agent || teacher) as a loss with a gradient on every guided
    token: the k2 estimate 0.5 d^2, d = log pi_agent - log pi_teacher of the sampled token clipped to
    [-clip, clip], token mean over the batch -> scalar. agent_logp [B, G] carries the gradient, teacher_logp
    [B, G] does not. On tokens the agent sampled, E[d grad log pi_agent] is the gradient of the reverse KL
    itself (k3 = r - 1 - log r as a loss would follow the forward KL's). Each token's pull is d: down where the
    agent is surer than the teacher, up where it is less sure, which the paper's shaping (a one-sided cost per
    turn) never does; a token with |d| past the clip adds clip^2 / 2 to the loss and no pull at all."""
    _check_same_shape(agent_logp=agent_logp, teacher_logp=teacher_logp, mask=mask)
    d = (agent_logp.float() - teacher_logp.detach().float()).clamp(-clip, clip)
    return token_mean(0.5 * d * d, mask)


def guide_mask(batch, guide: str = "thought") -> torch.Tensor:
    """The tokens the teacher guides, [B, G]: thoughts (section 4.4), or "thought+action" (ablation)."""
    return batch.gen_mask if guide == "thought+action" else batch.thought_mask


def teacher_kl(agent, teacher, batch, mask, estimator: str = "clip", kl_clip: float = 10.0):
    """turbo-kl (section 4.2): the frozen teacher scores the agent's own sampled tokens, image in context.
    -> the penalty per turn [B]; the teacher's per-token log-probs go into batch.teacher_logp (for
    `reverse_kl_loss`). One teacher forward: the agent's log-probs are those recorded while sampling (batch.logp)."""
    full = estimator in ("exact", "forward")  # full-vocabulary ablations need both distributions
    teacher_logp, _, teacher_logits = teacher.score(batch, return_logits=full)
    batch.teacher_logp = teacher_logp.float()
    if full:
        _, _, agent_logits = agent.score(batch, return_logits=True)
        kl = exact_reverse_kl if estimator == "exact" else forward_kl
        return kl(agent_logits, teacher_logits, mask, temperature=batch.temperature)
    return reverse_kl_penalty(batch.logp, teacher_logp, mask, estimator=estimator, lo=0.0, hi=kl_clip)


# ----------------------------------------------------------------------------------------------------------
# SFT on guided thoughts: GTR's corrector (section 3) and the SFT variant (section 4.3)


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
    return token_mean(nll, m)


def write_action(answer: str, action: str) -> str:
    """A DAgger target: the guide's thought with the action the agent executed (its tokens carry no loss)."""
    return answer_json({**json.loads(answer), "action": action})


def gtr_labels(experts, optimal, actions, grounding, envs):
    """GTR's corrector (section 3), privileged: a turn whose thought is not fully grounded or whose action is not
    optimal gets the expert's thought with the agent's action; a correct turn None. actions, grounding: [B]."""
    labels = []
    for i, env in enumerate(envs):
        a = int(actions[i])
        if grounding[i] == 1.0 and a in optimal[i]:  # nan grounding (nothing checkable) is not grounded
            labels.append(None)
        else:
            labels.append(write_action(experts[i], env.action_names[a]) if a >= 0 else experts[i])
    return labels


def teacher_answers(teacher, images, prompts, envs, retries: int = 3, temperature: float = 1.0, **sampling):
    """The SFT variant (section 4.3): the teacher answers each image and prompt itself; an invalid answer is
    resampled at temperature x1.1, up to `retries` times (None if none was valid). envs: one per prompt;
    sampling: top_k, repetition_penalty, max_new_tokens of teacher.sample."""
    answers, todo = [None] * len(prompts), list(range(len(prompts)))
    for _ in range(1 + retries):
        b = teacher.sample([images[i] for i in todo], [prompts[i] for i in todo], temperature=temperature, **sampling)
        still = []
        for text, i in zip(b.texts, todo):
            action, ok = parse_answer(text, envs[i].action_names, envs[i].answer_keys)
            if ok and action is not None:
                answers[i] = text
            else:
                still.append(i)
        todo, temperature = still, temperature * 1.1
        if not todo:
            break
    return answers


def turbo_sft_labels(guide, actions, envs):
    """The SFT variant's targets: every valid teacher answer, with the agent's action written in (after an invalid
    agent answer, which named no action, the teacher's action stays, also under --invalid random)."""
    return [g if g is None or actions[i] < 0 else write_action(g, env.action_names[actions[i]])
            for i, (g, env) in enumerate(zip(guide, envs))]


def dagger_loss(agent, dagger, n: int, guide: str = "thought") -> torch.Tensor:
    """CE on the guided tokens of n samples drawn uniformly from the whole DAgger buffer (sections 3, 4.3).
    dagger: a list of (image, prompt, target answer)."""
    idx = torch.randint(len(dagger), (n,)).tolist()
    images, prompts, answers = zip(*(dagger[i] for i in idx))
    b = agent.tokenize(list(images), list(prompts), list(answers))
    _, _, logits = agent.score(b, temperature=1.0, return_logits=True)  # [n, G, V]
    return sft_loss(logits, b.gen_ids, guide_mask(b, guide))


# ----------------------------------------------------------------------------------------------------------
# The SFT start (section 6): the solver is the teacher, its whole answers the labels


def solver_envs(task: str, n: int, seed: int) -> LockstepEnvs:
    """Envs whose solver writes an expert answer for each env each turn (Points24: solvable deals only)."""
    return LockstepEnvs(task, n, seed=seed, split="train", **({"solvable_only": True} if task == "points24" else {}))


def demo_loss(agent, demos: LockstepEnvs, noise: float = 0.0) -> torch.Tensor:
    """CE on whole expert answers (thought, action, EOS) for the demo envs' next turn, a share `noise` of the moves
    random; the demos then play them -> scalar."""
    images, prompts = demos.observe()
    answers = demos.expert_texts(noise)
    batch = agent.tokenize(images, prompts, answers)
    logp, _, _ = agent.score(batch, temperature=1.0)
    demos.step_texts(answers)
    return token_mean(-logp, batch.gen_mask)


def tokenizer_corpus(seed: int, episodes_per_task: int = 60) -> list[str]:
    """Prompts and expert answers of every task: the tiny model's BPE vocabulary is trained on them."""
    corpus = []
    for task in TASKS:
        envs = solver_envs(task, 4, seed)
        for _ in range(episodes_per_task // 4 * 6):
            _, prompts = envs.observe()
            answers = envs.expert_texts()
            # the chat template's role words once per prompt: BPE merges them into one token each, as it does
            # any word that frequent
            corpus += [f"user\n{p}\nassistant\n" for p in prompts] + answers
            envs.step_texts(answers)
    return corpus
