"""distill.py against hand computations, and the guidance on hand-made turns (docs/method.md 3, 4.2, 4.3, 4.4)."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill import (dagger_loss, exact_reverse_kl, forward_kl, guide_mask, gtr_labels,  # noqa: E402
                     reverse_kl_loss, reverse_kl_penalty, sft_loss, teacher_answers, teacher_kl, token_logprobs,
                     token_mean, turbo_sft_labels, write_action)
from env import LockstepEnvs  # noqa: E402

T = torch.tensor


def test_token_logprobs_alignment():
    # V = 3; logits at position t are log of a chosen distribution, so the answer is readable
    probs = T([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]])  # [1, 3, 3]
    tokens = T([[0, 2, 1]])
    out = token_logprobs(probs.log(), tokens)  # [1, 2]: P(tok1=2 | pos0), P(tok2=1 | pos1)
    assert torch.allclose(out, T([[math.log(0.25), math.log(0.2)]]), atol=1e-6)
    # temperature 2 on the same logits: softmax(log p / 2) is proportional to sqrt(p)
    s = probs[0, 0].sqrt()
    assert torch.allclose(token_logprobs(probs.log(), tokens, 2.0)[0, 0], (s[2] / s.sum()).log(), atol=1e-6)


def test_penalty_zero_when_models_agree_and_empty_turn():
    lp = -torch.rand(3, 5) * 4
    mask = T([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    for est in ("clip", "k1", "abs", "k3"):
        assert torch.equal(reverse_kl_penalty(lp, lp, mask, estimator=est), torch.zeros(3))
    lp2 = lp.clone()
    lp2[2] = float("-inf")  # padding of an all-action turn may hold -inf: still 0, not nan
    assert torch.equal(reverse_kl_penalty(lp2, lp, mask), torch.zeros(3))
    # the batch token mean reads masked entries only, a nan in padding included: (1 + 3) / 2
    assert token_mean(T([[1.0, float("nan")], [3.0, float("-inf")]]), T([[1, 0], [1, 0]])).item() == 2.0


def test_penalty_clipping_and_estimators():
    agent = T([[-1.0, -0.5, -20.0, -3.0]])
    teacher = T([[-3.0, -0.25, -0.5, -15.0]])  # d = [2, -0.25, -19.5, 12]
    mask = T([[1, 1, 1, 1]])
    assert torch.allclose(reverse_kl_penalty(agent, teacher, mask), T([(2 + 0 + 0 + 10) / 4]))
    assert torch.allclose(reverse_kl_penalty(agent, teacher, mask, lo=-1, hi=5), T([(2 - 0.25 - 1 + 5) / 4]))
    assert torch.allclose(reverse_kl_penalty(agent, teacher, mask, "k1"), T([(2 - 0.25 - 19.5 + 12) / 4]))
    assert torch.allclose(reverse_kl_penalty(agent, teacher, mask, "abs"), T([(2 + 0.25 + 19.5 + 12) / 4]))
    half = reverse_kl_penalty(agent, teacher, T([[1, 0, 0, 0]]), "k3")  # r = e^-2: e^-2 - 1 + 2
    assert torch.allclose(half, T([math.exp(-2) + 1]))
    d = torch.randn(64, 32) * 5  # k3 is never negative, whatever the sign of d
    assert (reverse_kl_penalty(d, torch.zeros_like(d), torch.ones_like(d), "k3") >= 0).all()
    with pytest.raises(ValueError):
        reverse_kl_penalty(agent, teacher, mask, "k2")
    with pytest.raises(ValueError):
        reverse_kl_penalty(agent, teacher[:, :3], mask)


def test_reverse_kl_loss_value_and_gradient_by_hand():
    # token 1: pi_agent 0.5, pi_teacher 0.25 -> d = log 2: loss 0.5 log^2 2, gradient +log 2 (pushed down)
    # token 2: pi_agent 0.25, pi_teacher 0.5 -> d = -log 2: the same loss, gradient -log 2 (pulled up)
    # token 3 is masked; row 2's only token has d = 30, clipped to 10: loss 50, no gradient
    agent = T([[math.log(0.5), math.log(0.25), -1.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    teacher = T([[math.log(0.25), math.log(0.5), -9.0], [-30.5, 0.0, 0.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    loss = reverse_kl_loss(agent, teacher, mask)
    assert abs(loss.item() - (math.log(2) ** 2 + 50) / 3) < 1e-5
    loss.backward()
    l2 = math.log(2) / 3   # d / 3 tokens on unclipped guided tokens; 0 where masked or clipped
    assert torch.allclose(agent.grad, T([[l2, -l2, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert reverse_kl_loss(agent, agent.detach(), mask).item() == 0.0   # no distance, no loss


def test_exact_kl_hand_three_word_vocab():
    p = T([0.5, 0.3, 0.2])
    q = T([0.2, 0.2, 0.6])
    rev = sum(p[i] * math.log(p[i] / q[i]) for i in range(3))  # KL(p||q) = 0.2332...
    fwd = sum(q[i] * math.log(q[i] / p[i]) for i in range(3))
    agent = torch.stack([p.log() + 1.7, q.log()])[None]  # [1, 2, 3]; shift: logits, not log-probs
    teacher = torch.stack([q.log(), q.log()])[None]
    mask = T([[1, 1]])
    assert torch.allclose(exact_reverse_kl(agent, teacher, mask), T([rev / 2]), atol=1e-6)
    assert torch.allclose(exact_reverse_kl(agent, teacher, T([[1, 0]])), T([rev]), atol=1e-6)
    assert torch.allclose(forward_kl(agent, teacher, T([[1, 0]])), T([fwd]), atol=1e-6)
    assert torch.allclose(exact_reverse_kl(teacher, teacher, mask), torch.zeros(1))
    a, b = torch.randn(4, 6, 50) * 3, torch.randn(4, 6, 50) * 3
    assert (exact_reverse_kl(a, b, torch.ones(4, 6), temperature=0.2) >= 0).all()
    assert (forward_kl(a, b, torch.ones(4, 6)) >= 0).all()


def test_sft_loss_hand_ce_and_ignores_actions():
    logits = torch.zeros(1, 3, 4)  # uniform -> CE = log 4 wherever the target is
    logits[0, 1] = T([2.0, 0.0, 0.0, 0.0])  # CE for target 0: -log(e^2 / (e^2 + 3))
    logits.requires_grad_(True)
    targets = T([[1, 0, -100]])  # -100 on the action token must be ignored
    mask = T([[True, True, False]])
    loss = sft_loss(logits, targets, mask)
    want = (math.log(4) - math.log(math.e ** 2 / (math.e ** 2 + 3))) / 2
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    assert torch.equal(logits.grad[0, 2], torch.zeros(4))  # no gradient into the action position
    # token mean over the batch, not a mean of row means: rows with 1 and 3 thought tokens
    lg = torch.randn(2, 3, 5)
    tg = torch.randint(0, 5, (2, 3))
    m = T([[1, 0, 0], [1, 1, 1]]).bool()
    ce = torch.nn.functional.cross_entropy(lg[m], tg[m])
    assert torch.allclose(sft_loss(lg, tg, m), ce)
    # empty mask: 0 with a graph that backpropagates zeros
    empty = sft_loss(logits, targets, torch.zeros(1, 3, dtype=torch.bool))
    assert empty.item() == 0 and empty.requires_grad
    logits.grad = None
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises((RuntimeError, IndexError)):  # a thought token labelled -100 is a bug, not ignored
        sft_loss(logits, targets, torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# The guidance with a tiny agent, on hand-made turns


def test_tokenizer_corpus_follows_its_seed():
    from distill import tokenizer_corpus
    a, b, c = (tokenizer_corpus(seed, episodes_per_task=4) for seed in (0, 0, 1))
    assert a == b and a != c and any(text.startswith("user\nSokoban") for text in a)


def test_demonstrations_come_from_training_levels_only():
    from distill import solver_envs
    from env import TASKS, in_eval_split
    for task in TASKS:
        envs, levels = solver_envs(task, 8, seed=0), set()
        for _ in range(12):
            levels |= {e.level for e in envs.envs}
            envs.step_texts(envs.expert_texts())
        assert len(levels) > 8 and not any(in_eval_split(level) for level in levels), task


def tiny_agent(seed=0):
    from agent import Agent
    from distill import tokenizer_corpus
    return Agent.build("tiny", tokenizer_corpus(0, episodes_per_task=8), seed=seed)


def test_teacher_kl_clips_at_kl_clip():
    # agent log-prob 0, teacher's -12 on the one guided token: log-ratio 12, clipped to --kl-clip 5 (default 10)
    class Teacher:
        def score(self, batch, return_logits=False):
            return torch.tensor([[-12.0, -1.0]]), None, None
    batch, mask = types.SimpleNamespace(logp=torch.tensor([[0.0, -1.0]]), temperature=1.0), torch.tensor([[1.0, 0.0]])
    assert teacher_kl(None, Teacher(), batch, mask, "clip", kl_clip=5.0).tolist() == [5.0]
    assert teacher_kl(None, Teacher(), batch, mask).tolist() == [10.0]
    assert batch.teacher_logp.tolist() == [[-12.0, -1.0]]


def test_teacher_answers_tries_one_plus_retries_times_warmer_each_time():
    calls = []

    class Teacher:  # never a valid answer
        def sample(self, images, prompts, temperature, **sampling):
            calls.append(round(temperature, 6))
            return types.SimpleNamespace(texts=["garbage"] * len(prompts))
    envs = LockstepEnvs("gridworld", 1, seed=0)
    assert teacher_answers(Teacher(), *envs.observe(), envs.envs, retries=2) == [None]
    assert calls == [1.0, 1.1, 1.21]


def test_demo_loss_plays_the_noisy_demonstrator():
    # --sft-noise P: the demonstrator's moves are random at rate P (drawn from the envs' noise stream); 0: never
    from distill import demo_loss
    agent = tiny_agent()
    for noise, draws in ((0.0, False), (0.5, True)):
        demos = LockstepEnvs("gridworld", 4, seed=0)
        before = demos.noise_rng.bit_generator.state
        demo_loss(agent, demos, noise)
        assert (demos.noise_rng.bit_generator.state != before) == draws


def test_teacher_kl_is_zero_when_teacher_equals_agent():
    agent = tiny_agent()
    images, prompts = LockstepEnvs("gridworld", 3, seed=0).observe()
    torch.manual_seed(0)
    with torch.no_grad():
        batch = agent.sample(images, prompts, temperature=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=24)
        mask = guide_mask(batch)
        # the agent's log-probs come from the decoding pass, the teacher's from a full forward: equal to 1e-5 (fp32)
        kl = teacher_kl(agent, agent.copy_frozen(), batch, mask)
        assert kl.shape == (3,) and kl.abs().max() < 1e-5
        # the teacher's per-token log-probs are kept for --kl-mode loss: here the agent's own
        assert (batch.teacher_logp - batch.logp).abs().max() < 1e-5 and batch.logp.abs().sum() > 0
        # a teacher that differs gives a positive penalty on the same turns, sampled-token or full-vocabulary
        other = tiny_agent(seed=1).copy_frozen()
        assert (teacher_kl(agent, other, batch, mask) > 0).all()
        assert (teacher_kl(agent, other, batch, mask, estimator="exact") > 0).all()
    assert torch.equal(guide_mask(batch, "thought+action"), batch.gen_mask) and torch.equal(mask, batch.thought_mask)


def test_gtr_corrector_labels_only_wrong_turns_and_masks_action_tokens():
    envs = LockstepEnvs("gridworld", 3, seed=3)
    images, prompts = envs.observe()
    experts, optimal = envs.expert_texts(), envs.optimal_actions()
    names = envs.envs[0].action_names
    right = [next(iter(o)) for o in optimal]
    wrong = [next(a for a in range(4) if a not in o) for o in optimal]
    # turn 0: grounded thought, optimal action -> no label; turn 1: a wrong fact; turn 2: a non-optimal move
    grounding, actions = np.array([1.0, 0.5, 1.0]), np.array([right[0], right[1], wrong[2]])
    labels = gtr_labels(experts, optimal, actions, grounding, envs.envs)
    assert labels[0] is None
    # a thought that states nothing checkable (grounding nan) is not grounded: corrected, though the move is optimal
    nothing = gtr_labels(experts, optimal, actions, np.array([np.nan, 1.0, 1.0]), envs.envs)[0]
    assert json.loads(nothing)["thoughts"] == json.loads(experts[0])["thoughts"]
    for i in (1, 2):
        label, expert = json.loads(labels[i]), json.loads(experts[i])
        assert label["thoughts"] == expert["thoughts"] and label["action"] == names[actions[i]]
    # the action tokens carry no loss: the SFT loss is the same whatever action is written in
    agent = tiny_agent()
    flipped = write_action(labels[1], names[(actions[1] + 1) % 4])
    losses = []
    for y in (labels[1], flipped):
        torch.manual_seed(0)
        losses.append(dagger_loss(agent, [(images[1], prompts[1], y)], 1).item())
    assert losses[0] == losses[1] and losses[0] > 0
    # ... and it is exactly the CE over the thought tokens the agent's own masks mark
    b = agent.encode([images[1]], [prompts[1]], [labels[1]], temperature=1.0)
    thought = b.thought_mask.bool()
    text = agent.tokenizer.decode(b.gen_ids[0][thought[0]])
    # the token '.","' holds the start of '"action":', so the thought ends just before it
    assert text == labels[1][:labels[1].rindex('.","action":')]
    assert math.isclose(losses[0], -(b.logp[thought]).mean().item(), rel_tol=1e-5)


def test_turbo_sft_targets_hold_teacher_thoughts_with_the_agents_action():
    envs = LockstepEnvs("gridworld", 3, seed=4)
    images, prompts = envs.observe()

    class ScriptedTeacher:  # first answer invalid, then a valid one: exercises the retry at T x 1.1
        def __init__(self):
            self.temperatures = []

        def sample(self, images, prompts, temperature, **kw):
            self.temperatures.append(temperature)
            ok = json.dumps({"thoughts": "teacher thought", "action": "left"})
            return type("B", (), {"texts": (["not json"] if len(self.temperatures) == 1 else [ok]) * len(prompts)})

    teacher = ScriptedTeacher()
    guide = teacher_answers(teacher, images, prompts, envs.envs, retries=3, temperature=1.0)
    assert teacher.temperatures == [1.0, 1.1] and all(g is not None for g in guide)
    actions = np.array([0, -1, 3])  # agent moved up, gave an invalid answer, moved right
    labels = [json.loads(y) for y in turbo_sft_labels(guide, actions, envs.envs)]
    assert [y["thoughts"] for y in labels] == ["teacher thought"] * 3
    assert [y["action"] for y in labels] == ["up", "left", "right"]
