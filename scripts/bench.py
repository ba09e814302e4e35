"""The system benchmark, one table: what a training update costs, part by part.

Every number is timed through the project's own code on real environments (Sokoban 6x6, 96x96 images):
  rollout      LockstepEnvs.observe -> Agent.sample -> step_texts, per turn of B envs in lockstep:
               env turns/s and generated tokens/s, for the tiny and small agents at B = 1, 16, 64
  ppo          one PPO optimizer step on a minibatch of train.py's --minibatch sampled turns (score with
               grad, backward, Adam): scored (generated) tokens/s
  teacher      the per-update guidance work of each method at train.py's default shape (num_envs envs x
               num_steps turns, ppo_epochs x the minibatches of --minibatch turns): gtr = solver labels
               (expert_texts + optimal_actions) each turn + a DAgger CE forward/backward each step;
               turbo-sft = the teacher samples its own answers each turn + the same CE; turbo-kl = one
               teacher forward over the agent's tokens each turn + folding the update's epoch states into
               the TIES history and rebuilding the teacher.
               Share = teacher work / (rollout + PPO + teacher work); ppo has none.
  merge        MergeHistory (TIES, SMA) time and peak memory against the number of checkpoints, each
               count in a fresh process (scripts/bench_merge.py does the measuring).
  loop         env turns/s of train.py's whole default update (turbo-kl, small model, Sokoban, 32 envs x 16
               turns, rollout + teacher + PPO + merge + checkpoint), old against new in one invocation: the
               code of commit --loop-base (exported with git archive) and this checkout, each in its own
               process (scripts/bench_loop.py), with the split of one update; the ratio is new / old. The
               trees take turns, --loop-rounds times, so that a drift in the machine's speed falls on both.
A random-init agent stops at once, so generation is forced to `--new-tokens` tokens (default 45, above the 27
a trained Sokoban agent writes). Median of `--repeats` after one warm-up.
Usage: python scripts/bench.py [--threads 2] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_merge  # noqa: E402
from bench_agent import timed as median_time  # noqa: E402  (one warm-up, then the median of repeats)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def sample(agent, images, prompts, n):
    with torch.no_grad(), bf16():
        return agent.sample(images, prompts, temperature=1.0, top_k=0, repetition_penalty=1.0,
                            min_new_tokens=n, max_new_tokens=n)


def rollout_turn(agent, envs, n):
    images, prompts = envs.observe()
    batch = sample(agent, images, prompts, n)
    envs.step_texts(batch.texts)
    return batch


def ppo_step(agent, opt, mb):
    with bf16():
        logp, values, _ = agent.score(mb)
    loss = -(logp.float().sum(-1) * 0.01).mean() + values.float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def dagger_step(agent, images, prompts, answers):
    """The extra CE of gtr / turbo-sft in one PPO step: one forward/backward on 32 labelled samples."""
    with bf16():
        b = agent.tokenize(images, prompts, answers)
        logp, _, _ = agent.score(b, temperature=1.0)
    (-(logp.float() * b.gen_mask).sum() / b.gen_mask.sum()).backward()
    agent.model.zero_grad(set_to_none=True)


LOOP_BASE = "7effb7d"   # the last commit before the KV-cache decoder and compact turns


def loop_rows(base: str, threads: int, updates: int, rounds: int) -> list[tuple[str, dict]]:
    """train.py's default update timed in the tree of commit `base` and in this checkout, both at the precision
    this checkout picks for this CPU (bf16 autocast only where oneDNN has bf16 kernels). The trees take turns,
    old then new, `rounds` times: a drift in the machine's speed falls on both rows of a round."""
    from train import fast_bf16
    rows, bf16 = [], "on" if fast_bf16("cpu") else "off"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C '{ROOT}' archive {base} | tar -x -C '{tmp}'", shell=True, check=True)
        for _ in range(rounds):
            for label, root in ((f"old ({base})", tmp), ("new (this checkout)", ROOT)):
                cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_loop.py"), "--root", root,
                       "--threads", str(threads), "--updates", str(updates), "--bf16", bf16]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"bench_loop.py failed in {label}:\n{r.stderr[-3000:]}")
                rows.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    return rows


def print_loop(rows):
    """One row per tree and round, each round's ratio, then the median of the rounds' ratios."""
    print("| loop | tree | bf16 | tokens / answer | env turns/s | s / update | generate | scoring | teacher | ppo "
          "| env |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = [new["turns_per_s"] / old["turns_per_s"] for (_, old), (_, new) in zip(rows[::2], rows[1::2])]
    for i, (label, r) in enumerate(rows):
        s = r["seconds_per_update"]
        print(f"| loop | {label} | {r['bf16']} | {r['tokens_per_answer']} | {r['turns_per_s']:.1f} | "
              f"{r['wall_per_update']:.1f} | "
              + " | ".join(f"{s[k]:.1f}" for k in ("generate", "scoring", "teacher", "ppo", "env")) + " |")
        if i % 2:
            print(f"| loop | new / old, round {i // 2 + 1} | | | {ratios[i // 2]:.2f}x | | | | | | |")
    print(f"| loop | new / old, median of {len(ratios)} rounds | | | {statistics.median(ratios):.2f}x | | | | | | |",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--new-tokens", type=int, default=45)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--merge-counts", default="1,4,16,64")
    p.add_argument("--quick", action="store_true", help="tiny only, batches 1,16, merge counts 1,4 (a smoke run)")
    p.add_argument("--only", default="", help="loop: only the training-loop comparison")
    p.add_argument("--loop-base", default=LOOP_BASE, help="commit whose train.py is the old row of the loop section")
    p.add_argument("--loop-updates", type=int, default=4, help="updates of 512 turns per tree (the first warms up)")
    p.add_argument("--loop-rounds", type=int, default=3, help="times each tree runs, old and new taking turns")
    args = p.parse_args()
    if args.only not in ("", "loop"):
        p.error("--only: loop or nothing")
    if args.loop_updates < 2 or args.loop_rounds < 1:
        p.error("--loop-updates must be >= 2 (the first warms up) and --loop-rounds >= 1")
    runs_loop = args.only == "loop" or not args.quick
    verify = ["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{args.loop_base}^{{commit}}"]
    if runs_loop and subprocess.run(verify, capture_output=True).returncode:
        p.error(f"--loop-base {args.loop_base}: no such commit in this repository")
    threads = args.threads or torch.get_num_threads()
    if runs_loop:
        print_loop(loop_rows(args.loop_base, threads, args.loop_updates, args.loop_rounds))
    if args.only == "loop":
        return
    if args.quick:
        args.sizes, args.batches, args.merge_counts, args.repeats = "tiny", "1,16", "1,4", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_merge.THREADS = args.threads
    # merge rows come from fresh processes (scripts/bench_merge.py), whose peak memory starts afresh at exec
    merge_rows = bench_merge.run_child("--child", "running", "--size", "5M", "--counts", args.merge_counts)
    from agent import Agent
    from distill import tokenizer_corpus
    from env import LockstepEnvs
    from merge import MergeHistory
    from train import Args
    d = Args()  # the default update's shape, as train.py runs it
    n, N, T, epochs, M = args.new_tokens, d.num_envs, d.num_steps, d.ppo_epochs, d.minibatch
    mbs = -(-N * T // M)  # minibatches per epoch
    corpus = tokenizer_corpus(0, episodes_per_task=12)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast, {n} generated tokens "
          f"per answer, median of {args.repeats}")
    print("| part | model | setting | time | throughput |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        agent = Agent.build(size, corpus, seed=0)
        label = f"{size} ({agent.num_params() / 1e6:.1f}M)"
        for B in map(int, args.batches.split(",")):
            envs = LockstepEnvs("sokoban", B, seed=0, split="train")
            t = median_time(lambda: rollout_turn(agent, envs, n), args.repeats)
            print(f"| rollout | {label} | batch {B} | {t * 1000:.0f} ms / turn | {B / t:,.1f} env turns/s, "
                  f"{B * n / t:,.0f} gen tok/s |", flush=True)

        envs = LockstepEnvs("sokoban", N, seed=1, split="train")
        t_turn = median_time(lambda: rollout_turn(agent, envs, n), args.repeats)
        images, prompts = envs.observe()
        reps = -(-M // N)  # a minibatch of M turns from the N current observations
        mb_images, mb_prompts = (images * reps)[:M], (prompts * reps)[:M]
        mb = sample(agent, mb_images, mb_prompts, n)
        opt = torch.optim.Adam(list(agent.model.parameters()) + list(agent.value_head.parameters()), lr=1e-7)
        t_ppo = median_time(lambda: ppo_step(agent, opt, mb), args.repeats)
        print(f"| ppo step | {label} | minibatch {M} | {t_ppo * 1000:.0f} ms / step | "
              f"{int(mb.gen_mask.sum()) / t_ppo:,.0f} scored tok/s |", flush=True)

        teacher = agent.copy_frozen()
        batch_n = sample(agent, images, prompts, n)
        experts = (envs.expert_texts() * reps)[:M]

        def kl_turn():
            with torch.no_grad(), bf16():
                teacher.score(batch_n)

        def merge_update():
            h = MergeHistory(agent.trainable_state(), method="ties", density=0.8)
            h.add([agent.trainable_state() for _ in range(epochs)])
            teacher.load_trainable_state(h.teacher_state())

        def gtr_turn():
            for e in envs.envs:  # a training turn meets a new state: the solver's per-state cache starts cold
                getattr(e, "_solution_cache", {}).clear()
            return envs.expert_texts(), envs.optimal_actions()

        per_turn = {"gtr": median_time(gtr_turn, args.repeats),
                    "turbo-sft": median_time(lambda: sample(teacher, images, prompts, n), args.repeats),
                    "turbo-kl": median_time(kl_turn, args.repeats)}
        t_ce = median_time(lambda: dagger_step(agent, mb_images, mb_prompts, experts), args.repeats)
        t_merge = median_time(merge_update, args.repeats)
        base = T * t_turn + epochs * mbs * t_ppo
        for method, t in per_turn.items():
            extra = T * t + (epochs * mbs * t_ce if method != "turbo-kl" else t_merge)
            what = "labels + CE" if method == "gtr" else "teacher answers + CE" if method == "turbo-sft" \
                else "teacher forward + merge"
            print(f"| teacher | {label} | {method}: {what} | {extra:.1f} s of {base + extra:.1f} s / update "
                  f"({N} envs x {T} turns, {epochs} x {mbs} steps) | "
                  f"{100 * extra / (base + extra):.0f}% of the update |", flush=True)
        print(f"| teacher | {label} | ppo: none | 0 s of {base:.1f} s / update | 0% |", flush=True)

    for r in merge_rows:
        print(f"| merge | 5M synthetic fp32 | {r['n']} checkpoint{'s' * (r['n'] > 1)} | {r['seconds']:.2f} s | "
              f"peak {r['peak_mb']:.0f} MB ({r['peak_mb'] / r['model_mb']:.1f} x the model) |", flush=True)


if __name__ == "__main__":
    main()
