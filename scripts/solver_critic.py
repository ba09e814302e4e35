"""train.py with a privileged critic: does a critic that fits change what RL learns?

    python scripts/solver_critic.py --task sokoban --seed 1 --out runs/solver-critic-s1 [train.py flags]

The agent's own value head does not fit at this scale (explained variance 0.00; `scripts/critic_ceiling.py`
measures how much any critic could explain). This runs train.py's own `main` with one change, the values V(s)
that GAE subtracts: V(s) is a table over the state's optimal solution length (the env's solver; -1 when the
level can no longer be solved), each entry the running mean (EMA, --table-alpha per update) of the
lambda-returns of the turns played from states of that length. A rollout's values come from the table before
that update's returns enter it, so the explained variance train.py logs is out of sample. It is an asymmetric
critic: it reads the solver, the policy still reads only the image. Sokoban and GridWorld, one process; the
table lives in memory (--resume starts it empty). Compare the run's eval.json with the default run of the seed.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from critic_ceiling import solution_length  # noqa: E402
from env import LockstepEnvs  # noqa: E402


def table_values(table: dict, lengths: np.ndarray) -> torch.Tensor:
    """V for each state from its solution length; a length not seen yet gets 0 (the value head's start)."""
    return torch.tensor([[table.get(int(d), 0.0) for d in row] for row in np.atleast_2d(lengths)],
                        dtype=torch.float32).reshape(lengths.shape)


def update_table(table: dict, lengths: np.ndarray, targets: np.ndarray, alpha: float) -> None:
    """Each length's entry moves to (1 - alpha) x old + alpha x the mean target of this update's turns of that
    length; a new length takes its mean."""
    for d in np.unique(lengths):
        mean = float(targets[lengths == d].mean())
        table[int(d)] = mean if int(d) not in table else (1 - alpha) * table[int(d)] + alpha * mean


def install(alpha: float) -> dict:
    """Route train.py's rollout and ppo_data through the table; returns the table (filled as training runs)."""
    table, seen, rollout, ppo_data = {}, [], train.rollout, train.ppo_data
    observe = LockstepEnvs.observe

    def observe_and_record(envs):  # the training envs only: evaluations build their own LockstepEnvs
        if getattr(envs, "record_lengths", False):
            seen.append(np.array([solution_length(e) for e in envs.envs]))
        return observe(envs)

    def table_rollout(agent, teacher, envs, args, stats, dagger=None, critic=None):
        seen.clear()
        envs.record_lengths = True
        batches, buf, _ = rollout(agent, teacher, envs, args, stats, dagger)  # the table is the only critic
        envs.record_lengths = False
        lengths = np.stack(seen)                                  # [T + 1, N]: T turns, then the bootstrap state
        values = table_values(table, lengths)
        buf["values"], buf["lengths"] = values[:-1], torch.as_tensor(lengths[:-1])
        return batches, buf, values[-1]

    def table_ppo_data(batches, buf, last_value, args):
        adv = train.gae(buf["rewards"], buf["values"], buf["dones"], last_value, args.gamma, args.gae_lambda)
        data = ppo_data(batches, buf, last_value, args)           # advantages from the values of before
        update_table(table, buf["lengths"].numpy(), (adv + buf["values"]).numpy(), alpha)
        return data

    LockstepEnvs.observe, train.rollout, train.ppo_data = observe_and_record, table_rollout, table_ppo_data
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--table-alpha", type=float, default=0.5, help="EMA weight of each update's mean (0, 1]")
    a, rest = p.parse_known_args()
    if "-h" in rest or "--help" in rest:  # this script's flag, then train.py's (whose parser exits)
        print(p.format_help())
    if not 0 < a.table_alpha <= 1:
        p.error("--table-alpha must be in (0, 1]")
    args = train.parse_args(rest)
    args.critic = "head"  # no image critic beside the table (and the head untrained unless --vf-coef > 0)
    if args.task not in ("sokoban", "gridworld"):
        p.error("--task must be sokoban or gridworld (a solver gives the solution length)")
    table = install(a.table_alpha)
    train.main(args)
    print("V by solution length:", {d: round(v, 2) for d, v in sorted(table.items())})


if __name__ == "__main__":
    main()
