"""Benchmark env.py: env steps/s, resets/s, expert_answer/s and parse_answer/s for each task, one table.

Steps follow random legal actions (with a reset when an episode ends); resets use fresh seeds, so
Sokoban's count includes its generator's BFS. expert_answer cycles over 64 fixed seeded levels (a rate from one
level would depend on its solution's length) and includes a fresh BFS each call (Sokoban's per-state cache is
cleared). Points24's solutions are cached per hand (715 hands); the cache is filled
first and its fill time printed, so the table shows the warm rates.
Usage: python scripts/bench_env.py [--seconds 1.0]
"""
import argparse
import copy
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import env as E  # noqa: E402


def rate(fn, seconds):
    """Calls of fn per second over about `seconds` of wall-clock (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def bench(task, seconds, **kw):
    e = E.make_env(task, **kw)
    rng = np.random.default_rng(0)
    seed = iter(range(10**9))
    e.reset(seed=next(seed))

    def step():
        _, _, term, trunc, _ = e.step(int(rng.integers(e.action_space.n)))
        if term or trunc:
            e.reset(seed=next(seed))  # rare next to steps; keeps the step loop going

    def reset():
        e.reset(seed=next(seed))

    levels = []  # the same 64 seeded levels whatever --seconds: the rate is an average over levels
    for s in range(64):
        e.reset(seed=10**6 + s)
        levels.append(copy.deepcopy(e))
    cycle = itertools.cycle(levels)

    def expert():
        x = next(cycle)
        if hasattr(x, "_solution_cache"):  # Sokoban: a fresh BFS every call
            x._solution_cache.clear()
        return x.expert_answer()

    answer = e.expert_answer()
    parse = lambda: E.parse_answer(answer, e.action_names, e.answer_keys)  # noqa: E731
    return tuple(rate(fn, seconds) for fn in (step, reset, expert, parse))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=1.0, help="wall-clock per measurement")
    args = ap.parse_args()
    t0 = time.perf_counter()
    hands = list(itertools.combinations_with_replacement(range(1, 11), 4))
    solvable = sum(bool(E.solve24(h)) for h in hands)
    print(f"Points24 solver cache fill: {len(hands)} hands ({solvable} solvable) in "
          f"{time.perf_counter() - t0:.1f} s\n")
    rows = [("sokoban", {}), ("gridworld", {}), ("points24", {}), ("points24", {"solvable_only": True}),
            ("sokoban", {"dim_room": (7, 7), "num_boxes": 2, "max_solution_len": 12})]
    print("| env | steps/s | resets/s | expert_answer/s | parse_answer/s |")
    print("|---|---|---|---|---|")
    for task, kw in rows:
        s, r, x, p = bench(task, args.seconds, **kw)
        name = task + ("" if not kw else " " + ",".join(f"{k}={v}" for k, v in kw.items()).replace(" ", ""))
        print(f"| {name} | {s:,.0f} | {r:,.0f} | {x:,.0f} | {p:,.0f} |")


if __name__ == "__main__":
    main()
