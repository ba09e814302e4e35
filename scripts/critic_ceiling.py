"""How much of a turn's return can any critic explain? V^pi measured by repeated continuations.

    python scripts/critic_ceiling.py [--agent DIR] [--states 192] [--k 8] [-- train.py flags]
    python scripts/critic_ceiling.py --agent runs/sokoban-turbo-kl-small-s1/ckpt/agent -- --threads 1

A critic's explained variance, EV = 1 - Var(G - V) / Var(G), cannot exceed the share of the return's
variance that the state explains, Var_s(V^pi(s)) / Var(G): the rest is what the sampling policy and the env
do afterwards. This probe measures that ceiling for one agent with train.py's sampling flags (Sokoban or
GridWorld, held-out levels):
1. --num-envs envs play --num-steps turns; each env is copied before each turn (the states a rollout
   visits, the turn counter included, so the time limit is part of the state here);
2. --states of those copies are each played --k times to the episode's end; a continuation's return is
   the discounted sum (--gamma) of the env rewards plus --invalid-penalty on an invalid turn, as train.py's;
3. it prints one JSON line: the ceiling (Var_s(V^pi) estimated without bias as the variance of the k-means
   minus the mean within-state variance over k) with a bootstrap standard error over states; the EV of the
   agent's own value head (its value at the first turn of each continuation) on the same returns; and the EV
   of a critic that knows only how many moves the state's optimal solution takes (-1: unsolvable), a table
   of mean returns per length, fitted leave-one-out: what a perfect reading of "how far from done" buys.
Every EV here is the one train.py logs, 1 - Var(G - V) / Var(G): blind to a constant offset in V.

Without --agent it measures the cached SFT start of train.py's flags (made first if missing).
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from env import LockstepEnvs, parse_answer  # noqa: E402


def solution_length(env) -> int:
    """Moves of an optimal solution from env's current state, -1 if none (Sokoban: a dead box)."""
    if hasattr(env, "solve"):
        sol = env.solve()
        return -1 if sol is None else len(sol)
    return env.dist.get(env.player, -1)


def ceiling_stats(G, lengths, values, boot=200, seed=0, critic_values=None) -> dict:
    """G [S, K]: K returns from each of S states; lengths [S]: their solution lengths; values [S]: the agent's
    V; critic_values [S]: a --critic image network's V, if given. -> the ceiling EV (and its bootstrap SE over
    states), the value head's EV, the solution-length table's, the image critic's."""
    S, K = G.shape
    var_total = G.var()

    def ceiling(g):
        return (g.mean(1).var() - g.var(1, ddof=1).mean() / K) / g.var()

    rng = np.random.default_rng(seed)
    boots = [ceiling(G[rng.integers(0, S, S)]) for _ in range(boot)]
    means = G.mean(1)
    keys, inv = np.unique(lengths, return_inverse=True)
    tot, cnt = np.bincount(inv, means, len(keys)), np.bincount(inv, minlength=len(keys))
    # leave-one-out: a state's own returns never enter its prediction; a length seen once gets the others' mean
    others = (means.sum() - means) / max(S - 1, 1)
    loo = np.where(cnt[inv] > 1, (tot[inv] - means) / np.maximum(cnt[inv] - 1, 1), others)
    ev = lambda pred: float(1 - (G - pred[:, None]).var() / var_total)  # noqa: E731  (as train.py logs it)
    return {"return_mean": float(G.mean()), "return_var": float(var_total), "ceiling_ev": float(ceiling(G)),
            "ceiling_ev_se": float(np.std(boots)), "value_head_ev": ev(np.asarray(values, float)),
            "solution_length_ev": ev(loo),
            **({"image_critic_ev": ev(np.asarray(critic_values, float))} if critic_values is not None else {})}


def sample_texts(agent, envs, args, chunk=128):
    """One sampled answer and the value head's V for each env's current state, in chunks."""
    texts, values = [], []
    for s in range(0, len(envs), chunk):
        part = envs[s:s + chunk]
        with torch.no_grad(), train.autocast(args):
            b = agent.sample([e._obs() for e in part], [e.prompt() for e in part], **train.sampling(args))
        texts += b.texts
        values += b.values.float().tolist()
    return texts, values


def continuation_returns(agent, states, k, args):
    """[S, K] discounted returns of k continuations of each state to its episode's end, and V of each state."""
    conts = [copy.deepcopy(s) for s in states for _ in range(k)]
    G, disc = np.zeros(len(conts)), np.ones(len(conts))
    live, first_values = np.ones(len(conts), bool), None
    while live.any():
        idx = np.flatnonzero(live)
        texts, values = sample_texts(agent, [conts[i] for i in idx], args)
        first_values = values if first_values is None else first_values
        for i, text in zip(idx, texts):
            env = conts[i]  # LockstepEnvs.step_texts under --invalid penalty, without its reset on done
            action, _ = parse_answer(text, env.action_names, env.answer_keys)
            _, r, term, trunc, _ = env.step(action) if action is not None else env.skip_turn()
            G[i] += disc[i] * (r + (args.invalid_penalty if action is None else 0.0))
            disc[i] *= args.gamma
            live[i] = not (term or trunc)
    return G.reshape(len(states), k), np.asarray(first_values).reshape(len(states), k).mean(1)


def image_critic_values(run_dir, states):
    """V of each state (its image and turns left) by the --critic image network saved in run_dir; None without."""
    if not run_dir:
        return None
    saved = train.load_train_state(os.path.join(run_dir, "ckpt", "state.pt"))["critic"]
    if saved is None:
        raise SystemExit(f"{run_dir} was not trained with --critic image: its checkpoint holds no critic")
    critic = train.ImageCritic(states[0].observation_space.shape, 0, states[0].symmetric)
    critic.load(saved)
    return critic.value([s._obs() for s in states], states, record=False).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agent", default="", help="agent directory (default: the cached SFT start)")
    p.add_argument("--states", type=int, default=192, help="states measured")
    p.add_argument("--k", type=int, default=8, help="continuations per state")
    p.add_argument("--critic", default="", help="a --critic image run directory: also score the critic in its "
                                                "last checkpoint (ckpt/state.pt) on the same returns")
    p.add_argument("train_args", nargs="*", help="train.py flags (after --)")
    a = p.parse_args()
    args = train.parse_args(a.train_args + ["--out", os.path.join("runs", "critic-ceiling-probe")]
                            if "--out" not in a.train_args else a.train_args)
    if args.task not in ("sokoban", "gridworld") or a.states < 2 or a.k < 2 or args.invalid != "penalty":
        p.error("needs --task sokoban or gridworld, --states >= 2, --k >= 2 and --invalid penalty")
    if args.threads:
        torch.set_num_threads(args.threads)
    agent = train.load_init_agent(a.agent, args) if a.agent else train.make_agent(args)
    train.seed_everything(args.seed)
    envs = LockstepEnvs(args.task, args.num_envs, seed=args.seed + 4242, split="eval",
                        invalid_penalty=args.invalid_penalty)
    snaps = []
    for _ in range(args.num_steps):
        snaps += [copy.deepcopy(e) for e in envs.envs]
        texts, _ = sample_texts(agent, envs.envs, args)
        envs.step_texts(texts)
    if a.states > len(snaps):
        p.error(f"--states {a.states} > the {len(snaps)} states visited (--num-envs x --num-steps)")
    pick = np.random.default_rng(args.seed).choice(len(snaps), a.states, replace=False)
    states = [snaps[i] for i in pick]
    lengths = np.array([solution_length(s) for s in states])
    G, values = continuation_returns(agent, states, a.k, args)
    row = {"agent": a.agent or train.sft_cache_dir(args), "task": args.task, "states": a.states, "k": a.k,
           "gamma": args.gamma, **ceiling_stats(G, lengths, values, critic_values=image_critic_values(a.critic,
                                                                                                      states))}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
