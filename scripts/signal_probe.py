"""Is there a learning signal? PPO updates from the cached SFT agent with real, shuffled or oracle advantages.

    python scripts/signal_probe.py --adv real    --updates 8 [-- train.py flags]
    python scripts/signal_probe.py --adv shuffle --updates 8      # same magnitudes, no information
    python scripts/signal_probe.py --adv oracle  --updates 8      # +1 if the move was optimal, else -1
    python scripts/signal_probe.py --adv oracle-pos --updates 8 -- --lr 1e-4  # 1 if optimal, else 0: no push-down
    python scripts/signal_probe.py --adv real --warmup 48 --updates 8 -- --lr 1e-4  # linear lr warm-up, 48 steps

    python scripts/signal_probe.py --adv oracle -- --task gridworld --lr 4e-5     # GridWorld, a higher lr

Run it from the repository root: it starts from the cached SFT agent in runs/sft-cache/ (made if missing), with
train.py's own optimizer (`rl_optimizer`), and by default runs the train.py flags' whole --total-steps budget.

The loop is train.py's own (rollout -> ppo_data -> ppo_update, ppo method, no teacher, train.py's critic: the
image critic valuing each turn as it is played and refit after each update, or the value head); only the
advantages differ. After each update it prints one JSON line: training success, approx-KL and clip fraction, the
correlation of the real advantages with "this turn's move was one of the solver's optimal moves", the critic's
explained variance on the rollout (critic_ev), and the held-out optimal-move rate: 256 start states of
evaluation-split levels, 2 sampled answers each (standard error about 2 points; sampled from a seed of their own,
so the probe leaves training's random numbers as they were). Sokoban or GridWorld (tasks whose env knows its
optimal moves per state).

Reading it: if `real` moves the optimal-move rate no more than `shuffle`, the policy gradient is noise at
this budget; `oracle` bounds what a perfect per-turn advantage could do with the same optimizer settings.
The `-pos` variants keep only the positive part (real: max(A, 0); oracle: 1 for an optimal move, else 0), so
no answer is pushed down: they tell whether the negative advantages are what breaks the policy.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from env import LockstepEnvs, parse_answer  # noqa: E402


def optimal_move_rate(agent, envs, images, prompts, optimal, args, seed, samples=2, chunk=64):
    """Share of sampled answers on fixed states whose action is one of that state's optimal moves. Seeded by
    `seed` in a forked RNG: training draws the same numbers whatever the probe samples."""
    env, hits = envs.envs[0], 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(samples):
            for s in range(0, len(prompts), chunk):
                with torch.no_grad(), train.autocast(args):
                    b = agent.sample(images[s:s + chunk], prompts[s:s + chunk], temperature=args.temperature,
                                     top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                     max_new_tokens=args.max_new_tokens)
                for i, text in enumerate(b.texts):
                    a, _ = parse_answer(text, env.action_names, env.answer_keys)
                    hits += a is not None and a in optimal[s + i]
    return hits / (samples * len(prompts))


def warm_up(opt, steps):
    """Linear lr warm-up over the first `steps` optimizer steps inside train.ppo_update: the k-th step runs at
    min(1, k / steps) times each group's "scheduled" lr (set per update by the caller)."""
    raw_step, count = opt.step, [0]

    def step(*a, **kw):
        count[0] += 1
        for g in opt.param_groups:
            g["lr"] = g["scheduled"] * min(1.0, count[0] / steps)
        return raw_step(*a, **kw)

    opt.step = step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adv", choices=("real", "shuffle", "oracle", "real-pos", "oracle-pos"), default="real")
    p.add_argument("--updates", type=int, default=0, help="stop after this many updates (0 = the run's whole "
                   "--total-steps budget, as train.py would)")
    p.add_argument("--warmup", type=int, default=0, help="linear lr warm-up over this many optimizer steps (0 = none)")
    p.add_argument("--probe-states", type=int, default=256)
    p.add_argument("train_flags", nargs="*", help="train.py flags (after --), e.g. --lr 3e-5 --task gridworld")
    a = p.parse_args()
    if a.probe_states < 1:
        p.error(f"--probe-states must be >= 1, got {a.probe_states}")
    # the probe writes no run: an --out that cannot exist keeps train.py's refusal to overwrite one out of the way
    args = train.parse_args(["--method", "ppo", "--out", os.path.join("runs", f"signal-probe-{os.getpid()}"),
                             *a.train_flags])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    agent = train.make_agent(args)  # the cached SFT warm-up (built first if missing)
    probe = LockstepEnvs(args.task, a.probe_states, seed=999, split="eval")
    p_images, p_prompts = probe.observe()
    p_optimal = probe.optimal_actions()

    train.seed_everything(args.seed)
    envs = LockstepEnvs(args.task, args.num_envs, seed=args.seed, split="train", invalid=args.invalid,
                        invalid_penalty=args.invalid_penalty)
    labels = []  # per played turn, in the buffer's order: +1 if the move was optimal in the state it was played from
    step_texts = envs.step_texts

    def labelled_step(texts):
        optimal = envs.optimal_actions()
        out = step_texts(texts)
        labels.extend(1.0 if int(m) in o else -1.0 for m, o in zip(out["action"], optimal))
        return out

    envs.step_texts = labelled_step
    critic = None  # train.py's critic: --critic image (the grid tasks' default) values each turn as it is played
    if args.critic == "image":
        critic = train.ImageCritic(envs.envs[0].observation_space.shape, args.seed,
                                   envs.envs[0].symmetric).to(args.device)
    params = agent.parameters()
    opt = train.rl_optimizer(agent, args)  # train.py's own (with --carry-moments: the warm-up's moments)
    if a.warmup > 0:
        warm_up(opt, a.warmup)
    stats = train.new_stats()
    print(json.dumps({"adv": a.adv, "update": 0, "env_steps": 0, "optimal_move_rate": optimal_move_rate(
        agent, probe, p_images, p_prompts, p_optimal, args, seed=0)}), flush=True)
    update = 0
    while train.budget_used(args, stats) < 1.0 and (a.updates <= 0 or update < a.updates):
        update += 1
        for g in opt.param_groups:  # train.py's schedule
            g["lr"] = g["scheduled"] = train.scheduled_lr(g["base_lr"], args, stats)
        labels.clear()
        batches, buf, last = train.rollout(agent, None, envs, args, stats, critic=critic)
        data = train.ppo_data(batches, buf, last, args)
        oracle = torch.tensor(labels)  # [played turns], the order of data["advantages"]
        corr = float(np.corrcoef(data["advantages"].numpy(), oracle.numpy())[0, 1])
        if a.adv == "shuffle":
            data["advantages"] = data["advantages"][torch.randperm(len(oracle))]
        elif a.adv == "oracle":
            data["advantages"] = (oracle - oracle.mean()) / (oracle.std() + 1e-8)
        elif a.adv == "real-pos":
            data["advantages"] = data["advantages"].clamp_min(0)
        elif a.adv == "oracle-pos":
            data["advantages"] = (oracle > 0).float()
        _, losses = train.ppo_update(agent, opt, params, data, args, stats, update)
        if critic is not None:  # as train.main: refit after it valued this rollout
            critic.fit(data["env_returns"], args.critic_steps, args.critic_updates)
        eps = stats["episodes"][-args.log_episodes:]
        print(json.dumps({"adv": a.adv, "update": update, "env_steps": stats["env_steps"],
                          "success": round(float(np.mean([e["success"] for e in eps])), 3),
                          "approx_kl": round(losses["losses/approx_kl"], 4),
                          "clipfrac": round(losses["losses/clipfrac"], 3), "corr_adv_optimal": round(corr, 3),
                          "critic_ev": round(losses["losses/explained_variance"], 3),
                          "optimal_move_rate": optimal_move_rate(agent, probe, p_images, p_prompts, p_optimal,
                                                                 args, seed=update)}), flush=True)
        stats["episodes"] = stats["episodes"][-args.log_episodes:]


if __name__ == "__main__":
    main()
