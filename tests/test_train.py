"""train.py: the loop's arithmetic by hand, the CLI's errors, and smoke runs of the script itself."""
import atexit
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402

# One SFT warm-up cache for every train.py a test runs in its own directory: the tiny warm-ups they start from
# (same task, model, steps, noise and seed: the cache key) are trained once per session, not once per test.
# test_distributed.py keeps a cache of its own: it checks that rank 0 writes it while rank 1 waits.
SFT_CACHE = tempfile.mkdtemp(prefix="gtr-test-sft-cache-")
atexit.register(shutil.rmtree, SFT_CACHE, True)


def share_sft_cache(cwd):
    """cwd/runs/sft-cache -> the session's cache; returns cwd."""
    os.makedirs(os.path.join(cwd, "runs"), exist_ok=True)
    link = os.path.join(cwd, "runs", "sft-cache")
    if not os.path.lexists(link):
        os.symlink(SFT_CACHE, link)
    return cwd


def test_gae_by_hand_with_terminal_in_the_middle():
    # gamma 0.9, lambda 0.95; the episode ends with turn 1, so turn 1 does not bootstrap from turn 2.
    rewards = torch.tensor([[1.0], [0.0], [2.0], [1.0]])
    values = torch.tensor([[0.5], [1.0], [0.0], [2.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    adv = train.gae(rewards, values, dones, torch.tensor([3.0]), gamma=0.9, lam=0.95)
    # t3: 1 + 0.9*3 - 2 = 1.7;  t2: 2 + 0.9*2 - 0 = 3.8, + 0.855*1.7 = 5.2535
    # t1: terminal: 0 - 1 = -1;  t0: 1 + 0.9*1 - 0.5 = 1.4, + 0.855*(-1) = 0.545
    assert torch.allclose(adv.squeeze(1), torch.tensor([0.545, -1.0, 5.2535, 1.7]), atol=1e-6)
    # V = 4 after the episode's end: t1 still ignores it (0 - 1 = -1); t2: 2 + 0.9*2 - 4 = -0.2, + 0.855*1.7 = 1.2535
    values[2] = 4.0
    adv = train.gae(rewards, values, dones, torch.tensor([3.0]), gamma=0.9, lam=0.95)
    assert torch.allclose(adv.squeeze(1), torch.tensor([0.545, -1.0, 1.2535, 1.7]), atol=1e-6)


def test_without_a_critic_values_are_zero_and_returns_are_discounted_rewards():
    # the default --vf-coef 0: the rollout records V = 0 (a head that outputs 1.5 everywhere is ignored) and skips
    # the bootstrap forward; with a critic the head's values go in. Then the GAE example above with V = 0:
    # t3 1; t2 2 + 0.855*1 = 2.855; t1 terminal 0; t0 1 + 0.855*0 = 1 (plain ppo: no shaping).
    from env import LockstepEnvs
    agent = tiny_agent()
    torch.nn.init.constant_(agent.value_head[-1].bias, 1.5)
    for vf_coef in (0.5, 0.0):
        args = train.Args(task="gridworld", model="tiny", method="ppo", num_envs=2, num_steps=2, max_new_tokens=8,
                          bf16=False, vf_coef=vf_coef)
        _, buf, last = train.rollout(agent, None, LockstepEnvs("gridworld", 2, seed=0), args, train.new_stats())
        v = 1.5 if vf_coef else 0.0
        assert torch.allclose(buf["values"], torch.full((2, 2), v)) and torch.allclose(last, torch.full((2,), v))
    buf = {"rewards": torch.tensor([[1.0], [0.0], [2.0], [1.0]]), "values": torch.zeros(4, 1),
           "dones": torch.tensor([[0.0], [1.0], [0.0], [0.0]]), "format_ok": torch.ones(4, 1), "kl": torch.zeros(4, 1)}
    returns, adv, _ = train.compute_returns(buf, torch.zeros(1), train.Args(method="ppo", bf16=False))
    expected = torch.tensor([1.0, 0.0, 2.855, 1.0])
    assert torch.allclose(returns.squeeze(1), expected, atol=1e-6)
    assert torch.allclose(adv.squeeze(1), (expected - expected.mean()) / expected.std(), atol=1e-5)
    # turbo-kl shapes each turn's return (format 3 / -2, minus beta 1 x KL, 100 for a bad format); the
    # lambda-returns the image critic fits stay GAE's: 1 + 3 - 0.5, 0 - 2 - 100, 2.855 + 3 - 0, 1 + 3 - 0.25
    shaped = {**buf, "format_ok": torch.tensor([[1.0], [0.0], [1.0], [1.0]]),
              "kl": torch.tensor([[0.5], [9.0], [0.0], [0.25]])}
    returns, _, lambda_returns = train.compute_returns(shaped, torch.zeros(1), train.Args(bf16=False))
    assert torch.allclose(returns.squeeze(1), torch.tensor([3.5, -102.0, 5.855, 3.75]), atol=1e-5)
    assert torch.allclose(lambda_returns.squeeze(1), expected, atol=1e-5)
    # beta 0.5 halves the penalty (0.25, 50, 0, 0.125); --kl-mode loss leaves only the format reward
    returns, _, _ = train.compute_returns(shaped, torch.zeros(1), train.Args(bf16=False, kl_coef=0.5))
    assert torch.allclose(returns.squeeze(1), torch.tensor([3.75, -52.0, 5.855, 3.875]), atol=1e-5)
    returns, _, _ = train.compute_returns(shaped, torch.zeros(1), train.Args(bf16=False, kl_mode="loss"))
    assert torch.allclose(returns.squeeze(1), torch.tensor([4.0, -2.0, 5.855, 4.0]), atol=1e-5)
    # with a critic, the GAE example's values: returns = A + V, advantages = A normalised (A from the test above)
    gae_adv, values = torch.tensor([0.545, -1.0, 5.2535, 1.7]), torch.tensor([0.5, 1.0, 0.0, 2.0])
    returns, adv, _ = train.compute_returns({**buf, "values": values[:, None]}, torch.tensor([3.0]),
                                            train.Args(method="ppo", bf16=False))
    assert torch.allclose(returns.squeeze(1), gae_adv + values, atol=1e-5)
    assert torch.allclose(adv.squeeze(1), (gae_adv - gae_adv.mean()) / gae_adv.std(), atol=1e-5)


def test_image_critic_values_each_turn_before_it_fits_them():
    # --critic image: the rollout's values are the critic's on each turn's image (each 16-px cell as 4 x 4 mean
    # colours) and turns left, by hand 15/15, 14/15, 13/15 of GridWorld's 15; the bootstrap value is not kept for the
    # fit. The fit then keeps --critic-updates updates of turns and changes the weights only after they were used.
    # Building the critic draws no number from training's generator.
    from env import LockstepEnvs
    envs = LockstepEnvs("gridworld", 2, seed=0)
    torch.manual_seed(5)
    plain = torch.rand(3)
    torch.manual_seed(5)
    critic = train.ImageCritic(envs.envs[0].observation_space.shape, seed=0, symmetric=True)
    assert torch.equal(torch.rand(3), plain)
    args = train.Args(task="gridworld", model="tiny", method="ppo", num_envs=2, num_steps=3, max_new_tokens=8,
                      bf16=False, critic="image")
    shown = []
    observe = envs.observe
    envs.observe = lambda: shown.append(observe()[0]) or observe()
    batches, buf, last = train.rollout(tiny_agent(), None, envs, args, train.new_stats(), critic=critic)
    assert len(shown) == 4 and len(critic.seen) == 3  # one look a turn and one at the end: the critic's too
    for t, (x, left) in enumerate(critic.seen):
        assert torch.allclose(left, torch.full((2,), (15 - t) / 15))
        pooled = np.stack(shown[t]).reshape(2, 24, 4, 24, 4, 3).mean((2, 4)).transpose(0, 3, 1, 2) / 255
        assert torch.allclose(x, torch.as_tensor(pooled, dtype=torch.float32), atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(buf["values"][t], critic(x, left), atol=1e-6)
    last_x = critic.inputs(shown[-1])
    with torch.no_grad():
        assert torch.allclose(last, critic(last_x, torch.full((2,), 12 / 15)), atol=1e-6)
    data = train.ppo_data(batches, buf, last, args)  # plain ppo: no shaping, the returns are GAE's
    assert torch.allclose(data["env_returns"], data["returns"]) and data["env_returns"].shape == (6,)
    before, seen = [p.detach().clone() for p in critic.parameters()], critic.seen
    for k in range(3):  # three updates of these turns, with targets 0, 1, 2: the replay keeps the last two
        critic.seen = list(seen)
        critic.fit(torch.full_like(data["env_returns"], float(k)), steps=2, keep=2)
    assert len(critic.replay) == 2 and critic.seen == [] and critic.replay[0][0].shape == (6, 3, 24, 24)
    assert [r[2].tolist() for r in critic.replay] == [[1.0] * 6, [2.0] * 6]
    assert not all(torch.equal(a, p) for a, p in zip(before, critic.parameters()))


SYMMETRIES = [(rows, cols, swap) for rows in (0, 1) for cols in (0, 1) for swap in (0, 1)]  # the first: identity


def symmetry(image, rows, cols, swap):
    """[C, H, W] flipped upside down, left to right, then transposed, as asked."""
    image = image.flip(-2) if rows else image
    image = image.flip(-1) if cols else image
    return image.transpose(-2, -1) if swap else image


def test_image_critic_fits_on_the_grids_symmetries():
    # symmetric: each fit batch is turns under one of the square's 8 symmetries, the same for the whole batch: a cell
    # moves with its colours, the channels stay; several different ones over 8 steps. Else the turns as they are.
    x = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for symmetric in (True, False):
        critic = train.ImageCritic((96, 96, 3), seed=0, symmetric=symmetric)
        seen, forward = [], critic.forward
        critic.forward = lambda xb, left: seen.append(xb) or forward(xb, left)
        critic.seen = [(x, torch.ones(5))]
        critic.fit(torch.zeros(5), steps=8, keep=1)
        used = set()
        for xb in seen:
            match = [k for k, sym in enumerate(SYMMETRIES)
                     if all(any(torch.equal(symmetry(x[i], *sym), row) for i in range(5)) for row in xb)]
            assert len(match) == 1
            used.add(match[0])
        assert len(used) > 2 if symmetric else used == {0}


def test_log_row_by_hand():
    # 2 turns x 2 envs. format 3 of 4; valid actions 2 of 4; grounding of the turns that state a fact (1, 0.5);
    # the teacher's KL over valid-format turns only (0.2, 0.4, 0.6); episodes: the last --log-episodes 2
    buf = {"format_ok": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "action_valid": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
           "grounding": torch.tensor([[1.0, math.nan], [0.5, math.nan]]), "kl": torch.tensor([[0.2, 9.0], [0.4, 0.6]]),
           "entropy": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    stats = {**train.new_stats(), "env_steps": 4, "episodes": [{"success": True, "return": 9.0, "length": 1},
                                                                {"success": False, "return": -1.5, "length": 15},
                                                                {"success": True, "return": 9.5, "length": 6}]}
    row = train.log_row(3, train.Args(log_episodes=2, bf16=False), buf, stats, {}, 1e-5)
    assert {k: row[k] for k in ("charts/format_rate", "charts/invalid_rate", "charts/thought_grounding",
                                "charts/thought_entropy", "charts/success_rate", "charts/episodic_return",
                                "charts/episodic_length", "env_steps")} == {
        "charts/format_rate": 0.75, "charts/invalid_rate": 0.5, "charts/thought_grounding": 0.75,
        "charts/thought_entropy": 2.5, "charts/success_rate": 0.5, "charts/episodic_return": 4.0,
        "charts/episodic_length": 10.5, "env_steps": 4}
    assert math.isclose(row["teacher/kl"], 0.4, rel_tol=1e-6)


def test_schedules_and_the_value_heads_learning_rate(monkeypatch):
    # RL: cosine over the budget, 8 of 32 turns -> 0.5 (1 + cos(pi / 4)); the value head's group starts at --vf-lr
    args = train.Args(total_steps=32, lr=1e-4, vf_lr=1e-3, bf16=False)
    lrs = [train.scheduled_lr(1e-4, args, {"env_steps": n}) for n in (0, 8, 32)]
    assert lrs[0] == 1e-4 and math.isclose(lrs[1], 1e-4 * 0.5 * (1 + math.cos(math.pi / 4))) and lrs[2] < 1e-20
    agent = tiny_agent()
    opt = train.rl_optimizer(agent, args)
    assert [g["base_lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    assert opt.param_groups[1]["params"] == list(agent.value_head.parameters())
    # the SFT warm-up: linear over 30 steps, then cosine to 0 over the rest (40 steps: 10 of cosine)
    seen = []
    monkeypatch.setattr(train, "solver_envs", lambda *a: None)
    monkeypatch.setattr(train, "sft_step", lambda _, opt, *a, **k: seen.append(opt.param_groups[0]["lr"]) or
                        torch.zeros(()))
    train.sft_warmup(agent, train.Args(task="gridworld", sft_steps=40, sft_lr=1e-3, bf16=False))
    expected = [1e-3 * (s + 1) / 30 for s in range(30)] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 10))
                                                           for k in range(10)]
    assert np.allclose(seen, expected, rtol=1e-12)


def test_rollout_orders_turns_as_ppo_reads_them_and_bootstraps_from_the_last_state():
    # the value head with weights of its own: V differs by state, so the bootstrap must be V(s_T), the state after
    # the last turn (env 0 meets its time limit then and starts a new level); ppo_data flattens values turn-major, as
    # the returns and the Batch. A truncation ends the episode for GAE as a termination does
    from env import LockstepEnvs
    agent = tiny_agent()
    torch.nn.init.normal_(agent.value_head[-1].weight, std=1.0, generator=torch.Generator().manual_seed(0))
    envs = LockstepEnvs("gridworld", 3, seed=0)
    envs.envs[0].steps = envs.envs[0].max_steps - 2
    truncated, step_texts = [], envs.step_texts

    def recording_step(texts):
        out = step_texts(texts)
        truncated.append(out["truncated"].tolist())
        return out
    envs.step_texts = recording_step
    args = train.Args(task="gridworld", model="tiny", method="ppo", num_envs=3, num_steps=2, max_new_tokens=8,
                      bf16=False, vf_coef=0.5)
    batches, buf, last = train.rollout(agent, None, envs, args, train.new_stats())
    with torch.no_grad():
        expected = agent.encode(*envs.observe(), [""] * 3).values
    assert torch.allclose(last, expected, atol=1e-6) and last.unique().numel() == 3
    assert truncated[1] == [True, False, False] and buf["dones"][:, 0].tolist() == [0.0, 1.0]
    buf["values"] = torch.arange(6.0).reshape(2, 3)
    data = train.ppo_data(batches, buf, last, args)
    assert data["values"].tolist() == [0, 1, 2, 3, 4, 5]
    assert data["batch"].texts == batches[0].texts + batches[1].texts  # the turns in the same order


def test_ratio_is_exp_of_lambda_weighted_logp_difference():
    thought = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    action = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.1]])
    new = torch.tensor([[-0.5, -1.5, -0.3, -0.1]])
    new_seq = train.sequence_logp(new, thought, action, 0.5)
    old_seq = train.sequence_logp(old, thought, action, 0.5)
    # thought: 0.5 * (0.5 + 0.5) = 0.5; action: 0.2 + 0 = 0.2 -> ratio e^0.7
    assert math.isclose((new_seq - old_seq).exp().item(), math.exp(0.7), rel_tol=1e-6)
    # advantage +1, ratio 2.01 is clipped at 1.1: policy loss -1.1
    pg, approx_kl, clipfrac = train.ppo_loss(new_seq, old_seq, torch.tensor([1.0]), clip=0.1)
    assert math.isclose(pg.item(), -1.1, rel_tol=1e-6) and clipfrac.item() == 1.0
    assert math.isclose(approx_kl.item(), math.exp(0.7) - 1 - 0.7, rel_tol=1e-5)  # (r - 1) - log r
    # the pessimistic bound: advantage -1 takes the unclipped e^0.7, not 1.1; advantage +1 at ratio e^-0.7 too
    pg, _, _ = train.ppo_loss(new_seq, old_seq, torch.tensor([-1.0]), clip=0.1)
    assert math.isclose(pg.item(), math.exp(0.7), rel_tol=1e-6)
    pg, _, _ = train.ppo_loss(old_seq, new_seq, torch.tensor([1.0]), clip=0.1)
    assert math.isclose(pg.item(), -math.exp(-0.7), rel_tol=1e-6)
    # value moved 0 -> 0 with return 1: 0.5 * 1^2
    z = torch.tensor([0.0])
    assert math.isclose(train.value_loss(z, z, torch.tensor([1.0]), vf_clip=0.1).item(), 0.5, rel_tol=1e-6)


def test_gtr_rollout_labels_and_counts_only_the_wrong_turns():
    # env 1 answers as the expert (an optimal move, every fact true): the corrector leaves it alone; the untrained
    # agent's other answers are wrong, so 2 turns x 2 envs get labels, the same count the buffer and the log see
    from env import LockstepEnvs
    envs = LockstepEnvs("gridworld", 3, seed=0)
    step_texts = envs.step_texts

    def env_1_answers_as_the_expert(texts):
        return step_texts([texts[0], envs.envs[1].expert_answer(), texts[2]])
    envs.step_texts = env_1_answers_as_the_expert
    args = train.Args(task="gridworld", model="tiny", method="gtr", num_envs=3, num_steps=2, max_new_tokens=8,
                      bf16=False)
    stats, dagger, seen = train.new_stats(), [], []
    observe = envs.observe

    def recording_observe():
        seen.append(observe())
        return seen[-1]
    envs.observe = recording_observe
    train.rollout(tiny_agent(), None, envs, args, stats, dagger=dagger)
    assert stats["labels"] == len(dagger) == 4
    # the labelled images are those of envs 0 and 2 (GridWorld's prompt is one sentence; its images differ)
    turns = [(0, 0), (0, 2), (1, 0), (1, 2)]   # (turn, env)
    assert all(np.array_equal(image, seen[t][0][i]) for (image, _, _), (t, i) in zip(dagger, turns))
    assert not np.array_equal(seen[0][0][0], seen[0][0][2])


def test_time_budget_counts_the_loops_wall_clock():
    args = train.Args(budget_by="time", budget_seconds=10.0)
    stats = dict(train.new_stats(), wall_time=5.0, teacher_time=1.0)
    assert train.budget_used(args, stats) == 0.5


def test_value_clip_range():
    """Old value 0, new value 3, return 10. Clipped at 0.1: max((3-10)^2, (0.1-10)^2) = 98.01, so the loss is
    0.5 * 98.01 and its gradient in the new value is 0 (V may move only 0.1 per rollout). Unclipped (0): 0.5 * 49,
    gradient 3 - 10 = -7."""
    z, new = torch.tensor([0.0]), torch.tensor([3.0], requires_grad=True)
    for vf_clip, loss, grad in ((0.1, 0.5 * 98.01, 0.0), (0.0, 24.5, -7.0)):
        vl = train.value_loss(new, z, torch.tensor([10.0]), vf_clip=vf_clip)
        (g,) = torch.autograd.grad(vl, new)
        assert math.isclose(vl.item(), loss, rel_tol=1e-6) and math.isclose(g.item(), grad, abs_tol=1e-6)


def test_token_ratio_clips_each_token_and_weights_thoughts_by_lambda():
    """Two tokens of one turn, advantage +1: a thought token (weight lambda 0.5) whose ratio is e^0.5 = 1.649,
    clipped to 1.1, and an action token (weight 1) whose ratio is e^-0.05 = 0.951, inside [0.9, 1.1].
    Loss = -(0.5 * 1.1 + 1 * 0.9512) / 1.5 = -1.00082; clip fraction 0.5 / 1.5 (the thought token's weight)."""
    old = torch.tensor([[-1.0, -0.5, 0.0]])
    new = torch.tensor([[-0.5, -0.55, -9.0]])  # third position is padding: weight 0, ignored
    weights = torch.tensor([[0.5, 1.0, 0.0]])
    pg, _, clipfrac = train.token_ppo_loss(new, old, torch.tensor([1.0]), weights, clip=0.1)
    assert math.isclose(pg.item(), -(0.5 * 1.1 + math.exp(-0.05)) / 1.5, rel_tol=1e-6)
    assert math.isclose(clipfrac.item(), 0.5 / 1.5, rel_tol=1e-6)
    # advantage -1: the pessimistic bound takes the thought token's unclipped e^0.5
    pg, _, _ = train.token_ppo_loss(new, old, torch.tensor([-1.0]), weights, clip=0.1)
    assert math.isclose(pg.item(), (0.5 * math.exp(0.5) + math.exp(-0.05)) / 1.5, rel_tol=1e-6)
    # the gradient reaches the unclipped action token only: d/dlogp of -(1 * e^(logp - old)) / 1.5
    new.requires_grad_(True)
    pg, _, _ = train.token_ppo_loss(new, old, torch.tensor([1.0]), weights, clip=0.1)
    (g,) = torch.autograd.grad(pg, new)
    assert torch.allclose(g, torch.tensor([[0.0, -math.exp(-0.05) / 1.5, 0.0]]), atol=1e-6)


def tiny_agent():
    from agent import Agent
    return Agent.build("tiny", train.tokenizer_corpus(0, episodes_per_task=8), seed=0)


def test_compact_prompts_are_26_tokens():
    # by hand: <|im_start|> user \n, <|vision_start|> 9 x <|image_pad|> (96x96 image, one per 32x32) <|vision_end|>,
    # the instruction, <|im_end|> \n <|im_start|> assistant \n; the role words are one token each
    from env import LockstepEnvs
    agent = tiny_agent()
    for task, instruction in (("sokoban", ["Sokoban", ":", " push", " boxes", " onto", " targets", "."]),
                              ("gridworld", ["GridWorld", ":", " walk", " to", " the", " goal", "."])):
        images, prompts = LockstepEnvs(task, 2, seed=1).observe()
        ids = agent.tokenize_prompts(images, prompts)["input_ids"][0].tolist()
        pieces = [agent.tokenizer.decode([i]) for i in ids]
        assert pieces == (["<|im_start|>", "user", "\n", "<|vision_start|>"] + ["<|image_pad|>"] * 9 + ["<|vision_end|>"]
                          + instruction + ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"])
        assert len(ids) == 26


def test_sft_cache_name_holds_every_warm_up_setting():
    """A warm-up that differs in any setting gets its own cache, and the name says which settings made it."""
    assert train.sft_cache_dir(train.Args(task="sokoban", seed=2, bf16=False)) == os.path.join(
        "runs", "sft-cache", "sokoban-small-s2-n1200-z0.5-b24-lr0.0003-f3")
    assert train.sft_cache_dir(train.Args(task="points24", model="tiny", sft_lr=5e-4, bf16=False)) == os.path.join(
        "runs", "sft-cache", "points24-tiny-s1-n2400-b32-lr0.0005-f3")
    names = {train.sft_cache_dir(train.Args(task="sokoban", seed=2, bf16=False, **kw)) for kw in
             ({}, {"sft_lr": 5e-4}, {"sft_batch": 32}, {"sft_steps": 1000}, {"sft_noise": 0.3}, {"model": "tiny"})}
    assert len(names) == 6
    assert train.sft_cache_dir(train.Args(task="sokoban", bf16=True)).endswith("-lr0.0003-bf16-f3")


def test_each_task_has_its_own_evaluation_split_and_sft_start_unless_told():
    """The paper's Points24 protocol by default (a held-out hand asks for arithmetic); held-out levels elsewhere.
    The warm-up's length, batch and demonstrator noise are the task's where a flag is -1, else the flag's."""
    tasks = ("sokoban", "gridworld", "points24")
    assert [train.Args(task=t, bf16=False).eval_split for t in tasks] == ["eval", "eval", "train"]
    assert train.Args(task="points24", eval_split="eval", bf16=False).eval_split == "eval"
    assert train.Args(task="sokoban", eval_split="train", bf16=False).eval_split == "train"
    starts = [(a.sft_steps, a.sft_batch, a.sft_noise) for a in (train.Args(task=t, bf16=False) for t in tasks)]
    assert starts == [(1200, 24, 0.5), (800, 32, 0.3), (2400, 32, 0.0)]
    a = train.Args(task="points24", sft_steps=0, sft_batch=8, sft_noise=0.25, bf16=False)
    assert (a.sft_steps, a.sft_batch, a.sft_noise) == (0, 8, 0.25)  # 0 steps: an untrained start, not the default
    assert "points24 2400" in train.Args.__dataclass_fields__["sft_steps"].metadata["help"]


def test_warm_up_moments_carry_into_the_rl_optimizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SFT cache is runs/sft-cache/ under the working directory
    agent = tiny_agent()
    args = train.Args(task="gridworld", model="tiny", carry_moments=True)
    name, p = next((n, p) for n, p in agent.model.named_parameters() if p.requires_grad)
    moments = {name: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(p, 0.5), "exp_avg_sq": torch.full_like(p, 4.0)},
               "no.such.weight": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    os.makedirs(train.sft_cache_dir(args))
    torch.save(moments, os.path.join(train.sft_cache_dir(args), "sft_moments.pt"))
    assert not train.rl_optimizer(agent, args, new_run=False).state  # a resumed run has its own moments
    opt = train.rl_optimizer(agent, args)
    assert len(opt.state) == 1 and p in opt.state  # only the weight of that name got them
    # one Adam step with zero gradient now moves p by lr * m_hat / (sqrt(v_hat) + eps) with the carried moments
    before = p.detach().clone()
    for q in opt.param_groups[0]["params"]:
        q.grad = torch.zeros_like(q)
    opt.param_groups[0]["lr"] = 1e-3
    opt.step()
    b1, b2 = 0.9, 0.999
    m, v = 0.9 * 0.5, 0.999 * 4.0
    step = 1e-3 * (m / (1 - b1 ** 8)) / (math.sqrt(v / (1 - b2 ** 8)) + 1e-5)
    assert torch.allclose(before - p.detach(), torch.full_like(p, step), rtol=1e-4)


def run_train(*argv, cwd=None, timeout=600, wait=True):
    """train.py in a subprocess, the way a user runs it; a given cwd shares the session's SFT cache."""
    if cwd is not None:
        share_sft_cache(cwd)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bf16_is_on_only_where_it_is_fast(monkeypatch):
    """bf16 autocast by default on CUDA and on CPUs with oneDNN bf16 kernels; an explicit flag wins either way."""
    for cpu_has_kernels in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_has_kernels)
        assert train.Args().bf16 is cpu_has_kernels and train.Args(device="cuda").bf16 is True
        assert train.Args(bf16=True).bf16 is True and train.Args(device="cuda", bf16=False).bf16 is False


BAD_VALUES = [  # (argv, what the one line must name)
    (["--task", "chess"], "--task"), (["--method", "dpo"], "--method"), (["--total-steps", "0"], "--total-steps"),
    (["--num-envs", "-3"], "--num-envs"), (["--seed", "-1"], "--seed"), (["--device", "mps"], "--device"),
    (["--device", "tpu"], "--device"), (["--device", "gpu0"], "--device"), (["--ema-alpha", "7"], "--ema-alpha"),
    (["--gamma", "5"], "--gamma"), (["--gae-lambda", "9"], "--gae-lambda"), (["--eval-episodes", "-1"], "--eval-episodes"),
    (["--log-episodes", "0"], "--log-episodes"), (["--curve-episodes", "0"], "--curve-episodes"),
    (["--threads", "-2"], "--threads"), (["--seed", "4294967296"], "--seed"),
    (["--threads", "2147483648"], "--threads"),
    (["--max-new-tokens", "5000"], "--max-new-tokens"), (["--teacher-retries", "-3"], "--teacher-retries"),
    (["--max-skips", "-1"], "--max-skips"), (["--format-reward", "nan,inf"], "--format-reward"),
    (["--format-reward", "3"], "--format-reward"), (["--invalid-penalty", "nan"], "--invalid-penalty"),
    (["--kl-coef=-inf"], "--kl-coef"), (["--lr", "-1e-5"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--temperature", "0"], "--temperature"), (["--eval-split", "test"], "--eval-split"),
    (["--model", "/nonexistent/qwen"], "--model"), (["--init", "/nonexistent/agent"], "--init"),
    (["--total-steps", "abc"], "--total-steps"), (["--no-such-flag"], "--no-such-flag"),
    (["--tot", "5"], "--tot"),  # no abbreviations: a typo is not silently another flag
    (["--critic", "mlp"], "--critic"), (["--critic", "image", "--vf-coef", "0.5"], "--vf-coef"),
    (["--critic-steps", "0"], "--critic-steps"), (["--density", "0"], "--density"),
    (["--ema-alpha", "0"], "--ema-alpha"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no CUDA device")])


@pytest.mark.parametrize("argv, needle", BAD_VALUES)
def test_bad_cli_values_exit_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and "usage" not in err[0]


def test_help_opens_with_the_flags_a_student_changes(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and len(text.split("\n\n")[0].splitlines()) == 1  # a one-line usage
    headings = [text.index(h + ":") for h in ("what to train", "PPO (section 2)", "the teacher (section 4)", "ablations")]
    assert headings == sorted(headings) and text.index("--task") < text.index("--lr") < headings[1]


def test_files_where_directories_belong_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    for flag in ("--model", "--init", "--out"):
        with pytest.raises(SystemExit) as e:
            train.parse_args([flag, "f.txt"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"{flag} f.txt is a file" in err[0]


def test_a_missing_path_in_a_local_directory_is_not_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")  # runs/x has the shape of a hub id owner/name; with runs/ here it is a path
    for flag in ("--model", "--init"):
        with pytest.raises(SystemExit) as e:
            train.parse_args([flag, "runs/x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"{flag} runs/x: no such model directory" in err[0]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not readable JSON"), ("", "not readable JSON"), ("[1, 2]", "a JSON list"),
    ('{"task": "sokoban", "method": "ppo", "model": "small", "seed": "one", "out": "r"}', "seed = 'one' is not a int"),
    ('{"task": "sokoban"}', "it lacks method"),
])
def test_damaged_args_json_is_named_in_one_line(tmp_path, capsys, content, needle):
    (tmp_path / "args.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--resume", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(tmp_path / "args.json") in err[0] and needle in err[0]


def test_critic_default_is_the_tasks_and_old_runs_resume_without_one(tmp_path, monkeypatch):
    # the image critic on the grid tasks, none on Points24, the paper's head when --vf-coef asks for it; a run whose
    # args.json predates --critic had none (head, V = 0) and resumes so
    assert [train.Args(task=t).critic for t in ("sokoban", "gridworld", "points24")] == ["image", "image", "head"]
    assert train.Args(vf_coef=0.5).critic == "head" and train.Args(critic="image").critic == "image"
    monkeypatch.chdir(tmp_path)
    saved = {k: v for k, v in dataclasses.asdict(train.Args(out="old")).items() if k != "critic"}
    os.makedirs("old")
    with open(os.path.join("old", "args.json"), "w") as f:
        json.dump(saved, f)
    assert train.parse_args(["--resume", "old"]).critic == "head"


def test_model_dir_that_is_not_a_vlm_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = run_train("--model", str(tmp_path))
    assert r.returncode == 2 and "not a vision-language checkpoint" in r.stderr


SMOKE = ["--task", "gridworld", "--model", "tiny", "--sft-steps", "10", "--num-envs", "4", "--num-steps", "4",
         "--total-steps", "32", "--ppo-epochs", "2", "--minibatch", "8", "--max-new-tokens", "24",
         "--eval-episodes", "4"]
METRIC_KEYS = {"update", "env_steps", "charts/success_rate", "charts/episodic_return", "charts/format_rate",
               "charts/invalid_rate", "charts/thought_grounding", "charts/thought_entropy", "teacher/kl",
               "losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "charts/lr",
               "charts/wall_time", "teacher/time"}


EXTRA_KEYS = {"charts/episodic_length", "teacher/labels", "losses/sft", "losses/teacher_kl",
              "losses/explained_variance", "charts/skipped_steps"}


def check_smoke_run(method, run, r):
    """Two updates of 16 turns ran, every method logging the same keys, and the run's files are there."""
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [row["update"] for row in rows] == [1, 2]
    assert METRIC_KEYS <= set(rows[0]) and rows[1]["env_steps"] == 32
    assert set(rows[0]) == METRIC_KEYS | EXTRA_KEYS  # every method logs the same keys, so compare can plot them
    ev = json.load(open(run / "eval.json"))
    assert ("teacher" in ev) == method.startswith("turbo") and ev["agent"]["episodes"] == 4
    # the last line says where the results are, and they are there
    assert r.stdout.strip().splitlines()[-1] == (f"results: {run / 'eval.json'}  curves: {run / 'curves.png'}  "
                                                 f"metrics: {run / 'metrics.jsonl'}")
    assert (run / "curves.png").stat().st_size > 0
    if method == "gtr":  # an untrained tiny agent is always wrong: every turn gets a corrector label
        assert rows[-1]["teacher/labels"] == 32 and rows[-1]["losses/sft"] > 0
    from agent import Agent
    Agent.load(str(run / "ckpt" / "agent"))  # the checkpoint is a loadable agent


@pytest.mark.parametrize("method", ["ppo --ratio token", "gtr", "turbo-sft", "sft", "turbo-kl --kl-mode loss"])
def test_smoke_two_updates(method, tmp_path):   # turbo-kl with the paper's shaping: below
    method, *extra = method.split()
    r = run_train(*SMOKE, "--method", method, *extra, "--out", str(tmp_path / method), cwd=tmp_path)
    check_smoke_run(method, tmp_path / method, r)
    rows = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    # the KL loss term is logged where it is used and only there; the teacher is another model after update 1
    assert ((rows[-1]["losses/teacher_kl"] or 0) > 0) == (extra == ["--kl-mode", "loss"])   # sft: null


def test_curve_every_logs_held_out_success_without_changing_training(tmp_path):
    """The turbo-kl smoke run, then the same with --curve-every: it scores agent and teacher on held-out levels
    every N updates (the eval/ keys) and draws them; evaluation samples from its own generator, so every training
    number equals the run without it."""
    runs = {}
    for name, extra in (("plain", []), ("curve", ["--curve-every", "1", "--curve-episodes", "2"])):
        r = run_train(*SMOKE, "--method", "turbo-kl", *extra, "--out", str(tmp_path / name), cwd=tmp_path)
        if name == "plain":
            check_smoke_run("turbo-kl", tmp_path / name, r)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    held = {"eval/agent_success", "eval/teacher_success"}
    assert all(held <= set(row) and all(0 <= row[k] <= 1 for k in held) for row in runs["curve"])
    strip = lambda row: {k: v for k, v in row.items() if k not in held | TIME_KEYS}  # noqa: E731
    assert [strip(row) for row in runs["curve"]] == [strip(row) for row in runs["plain"]]


def test_curve_evaluations_are_off_the_training_clock(tmp_path, monkeypatch):
    """--budget-seconds and charts/wall_time count the training loop only: here each curve evaluation takes
    1,000 s on the clock train.py reads, and no logged wall time reaches that."""
    share_sft_cache(tmp_path)
    monkeypatch.chdir(tmp_path)
    skew = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: time.time() + skew[0]))

    def slow_held_out(model, args, episodes=None, desc="eval"):
        skew[0] += 1000.0
        return {"success": 0.5}
    monkeypatch.setattr(train, "held_out", slow_held_out)
    train.main(train.parse_args([*SMOKE, "--method", "ppo", "--curve-every", "1", "--eval-episodes", "0",
                                 "--out", str(tmp_path / "run"), "--threads", "1"]))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert skew[0] == 2000.0 and [row["eval/agent_success"] for row in rows] == [0.5, 0.5]
    assert all(0 < row["charts/wall_time"] < 1000 for row in rows)


def test_a_damaged_warm_up_moments_file_is_named(tmp_path, monkeypatch):
    from agent import CheckpointError
    monkeypatch.chdir(tmp_path)
    args = train.Args(task="gridworld", model="tiny", carry_moments=True)
    path = os.path.join(train.sft_cache_dir(args), "sft_moments.pt")
    os.makedirs(os.path.dirname(path))
    for content in (None, b"not a zip archive"):   # missing, then damaged
        if content:
            open(path, "wb").write(content)
        with pytest.raises(CheckpointError, match=f"{path} is missing, corrupt or truncated .*Adam moments"):
            train.rl_optimizer(tiny_agent(), args)


def test_plain_save_pretrained_directory_trains(tmp_path):
    from agent import Agent
    tiny = Agent.build("tiny", ['{"thoughts":"player 1,1 so up.","action":"up"}'] * 4, seed=0)
    tiny.model.save_pretrained(tmp_path / "qwen")  # what a real Qwen2.5-VL directory holds: model + processor
    tiny.processor.save_pretrained(tmp_path / "qwen")
    r = run_train("--task", "gridworld", "--model", str(tmp_path / "qwen"), "--num-envs", "2", "--num-steps", "2",
                  "--total-steps", "4", "--ppo-epochs", "1", "--max-new-tokens", "16", "--eval-episodes", "0",
                  "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Faults and resume


def test_nan_loss_is_skipped_and_never_reaches_the_weights():
    from agent import Batch
    from env import LockstepEnvs
    agent = tiny_agent()
    args = train.Args(task="gridworld", model="tiny", method="ppo", num_envs=2, num_steps=2, max_new_tokens=16, bf16=False,
                      ppo_epochs=2, minibatch=2, max_skips=100, critic="head")
    stats = train.new_stats()
    batches, buf, last = train.rollout(agent, None, LockstepEnvs("gridworld", 2, seed=0), args, stats)
    returns, adv, _ = train.compute_returns(buf, last, args)
    adv[0, 0] = float("nan")  # one poisoned turn: every minibatch that holds it must be skipped
    data = {"batch": Batch.cat(batches), "returns": returns.reshape(-1), "advantages": adv.reshape(-1),
            "values": buf["values"].reshape(-1)}
    params = [p for p in agent.model.parameters() if p.requires_grad] + list(agent.value_head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    args.ppo_epochs, args.minibatch = 1, 4  # one minibatch holding all 4 turns, the NaN among them
    before = [p.detach().clone() for p in params]
    train.ppo_update(agent, opt, params, data, args, stats, update=7)
    assert stats["skipped_steps"] == 1 and all(torch.equal(a, p) for a, p in zip(before, params))
    args.max_skips = 2
    with pytest.raises(FloatingPointError, match="update 7: 2 optimizer steps in a row"):
        train.ppo_update(agent, opt, params, data, args, stats, update=7)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    data["advantages"] = torch.nan_to_num(data["advantages"])  # a finite step ends the run of skips
    train.ppo_update(agent, opt, params, data, args, stats, update=8)
    assert stats["skips_in_row"] == 0 and stats["skipped_steps"] == 2


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    from env import LockstepEnvs

    class FakeAgent:
        def __init__(self, fail):
            self.fail = fail

        def save(self, path):
            if self.fail:
                raise OSError(28, "No space left on device")
            os.makedirs(path)
            open(os.path.join(path, "weights"), "w").write("update 1")

    args = train.Args(task="gridworld", model="tiny", out=str(tmp_path))
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w])
    envs = LockstepEnvs("gridworld", 1, seed=0)
    train.save_checkpoint(args, 1, FakeAgent(False), None, opt, envs, None, {}, None)
    with pytest.raises(OSError, match="previous checkpoint .* is intact"):
        train.save_checkpoint(args, 2, FakeAgent(True), None, opt, envs, None, {}, None)
    assert open(tmp_path / "ckpt" / "agent" / "weights").read() == "update 1"
    assert train.load_train_state(str(tmp_path / "ckpt" / "state.pt"))["update"] == 1
    assert not (tmp_path / "ckpt.tmp").exists()


def test_a_checkpoint_brings_back_merge_history_dagger_buffer_envs_and_logged_episodes(tmp_path):
    # what the smoke resume below cannot see at its size (its tiny agent never writes a valid answer, so the teacher
    # and the logged episodes do not shape its numbers): each part the loop keeps, saved and resumed by hand
    from env import LockstepEnvs
    from merge import MergeHistory
    agent, args = tiny_agent(), train.Args(task="gridworld", model="tiny", out=str(tmp_path), bf16=False)
    base, g = agent.trainable_state(), torch.Generator().manual_seed(0)
    history = MergeHistory(base, mode="ema", alpha=0.5, density=0.8)
    for _ in range(2):
        history.add([{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}])
    envs = LockstepEnvs("gridworld", 2, seed=0)
    images, prompts = envs.observe()
    dagger = [(images[0], prompts[0], label) for label in ("a", "b", "c")]
    stats = {**train.new_stats(), "env_steps": 64, "episodes": [{"success": True, "return": 9.5, "length": 6}]}
    train.save_checkpoint(args, 3, agent, None, train.rl_optimizer(agent, args), envs, history, stats, dagger)
    fresh, other_envs = MergeHistory(base, mode="ema", alpha=0.5, density=0.8), LockstepEnvs("gridworld", 2, seed=1)
    got_stats, got_dagger, start = train.resume(str(tmp_path / "ckpt"), args, train.rl_optimizer(agent, args),
                                                agent.parameters(), fresh, other_envs, None,
                                                str(tmp_path / "metrics.jsonl"))
    assert start == 4 and got_stats == stats and [y for *_, y in got_dagger] == ["a", "b", "c"]
    assert fresh.count == 2 and all(torch.equal(fresh.teacher_state()[k], history.teacher_state()[k]) for k in base)
    assert other_envs.observe()[1] == prompts and all(np.array_equal(a, b) for a, b in zip(other_envs.observe()[0],
                                                                                           images))


RESUME = ["--task", "gridworld", "--model", "tiny", "--sft-steps", "10", "--num-envs", "4", "--num-steps", "4",
          "--total-steps", "64", "--ppo-epochs", "2", "--minibatch", "8", "--max-new-tokens", "24",
          "--eval-episodes", "0", "--method", "turbo-kl", "--critic", "image", "--critic-steps", "3"]
TIME_KEYS = {"charts/wall_time", "teacher/time"}


def metrics_without_time(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in open(path)]


def test_kill_and_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    full = run_train(*RESUME, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    # the same command again would overwrite the run: refused, with the way out named
    again = run_train(*RESUME, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert again.returncode == 2 and f"--resume {tmp_path / 'full'}" in again.stderr.strip().splitlines()[-1]
    killed = tmp_path / "killed"
    p = run_train(*RESUME, "--out", str(killed), cwd=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:  # SIGKILL as soon as update 2 is logged: mid-save or mid-update 3
        if (killed / "metrics.jsonl").exists() and len(open(killed / "metrics.jsonl").readlines()) >= 2:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait() == -signal.SIGKILL
    assert len(open(killed / "metrics.jsonl").readlines()) < 4  # it really was cut short
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"update": 9, "charts/succ')  # what a full disk leaves: dropped with a warning on resume
    resumed = run_train("--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dropped line" in resumed.stdout
    a, b = metrics_without_time(tmp_path / "full" / "metrics.jsonl"), metrics_without_time(killed / "metrics.jsonl")
    assert [r["update"] for r in b] == [1, 2, 3, 4]
    assert a == b
    # only the flags that extend or re-place a run may change on resume
    bad = run_train("--resume", str(killed), "--lr", "1e-3", cwd=tmp_path)
    assert bad.returncode == 2 and "--lr cannot change in a resumed run" in bad.stderr
    # one flipped byte in the newest weights: named, and the previous checkpoint (update 3) takes over
    weights = killed / "ckpt" / "agent" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    ext = run_train("--resume", str(killed), "--total-steps", "96", cwd=tmp_path)
    assert ext.returncode == 0, ext.stderr[-3000:]
    assert f"{weights} is damaged" in ext.stdout and "ckpt.prev instead" in ext.stdout
    rows = metrics_without_time(killed / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["env_steps"] == 96
    assert json.load(open(killed / "args.json"))["total_steps"] == 96
    assert oct(os.stat(killed / "ckpt" / "agent" / "model.safetensors").st_mode & 0o777) == "0o644"
    # both checkpoints damaged: each is named, no traceback
    for d in ("ckpt", "ckpt.prev"):
        state = killed / d / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    bad = run_train("--resume", str(killed), cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert str(killed / "ckpt" / "state.pt") in bad.stderr and str(killed / "ckpt.prev" / "state.pt") in bad.stderr
    # a checkpoint without manifests whose agent is another model (another vocabulary) is named, not half-loaded
    from agent import Agent
    state = killed / "ckpt" / "state.pt"
    state.write_bytes((tmp_path / "full" / "ckpt" / "state.pt").read_bytes())
    (killed / "ckpt" / "manifest.json").unlink()
    other = Agent.build("tiny", ['{"thoughts": "a", "action": "up"}'] * 2, seed=0)
    other.save(str(killed / "ckpt" / "agent"))
    other.save(str(killed / "ckpt" / "teacher"))
    bad = run_train("--resume", str(killed), cwd=tmp_path)
    assert bad.returncode == 1 and "does not match the agent" in bad.stderr and str(state) in bad.stderr
    assert "Traceback" not in bad.stderr


def test_sft_baseline_stops_on_its_time_budget(tmp_path):
    r = run_train(*SMOKE, "--method", "sft", "--budget-by", "time", "--budget-seconds", "2", "--eval-episodes", "0",
                  "--out", str(tmp_path / "sft"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    # it stops at the first update that ends past the budget, whatever --total-steps says
    assert rows[-1]["charts/wall_time"] >= 2 and all(row["charts/wall_time"] < 2 for row in rows[:-1])
    assert rows[-1]["losses/sft"] > 0 and rows[-1]["losses/policy"] is None
