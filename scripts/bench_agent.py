"""Throughput of Agent.sample (generated tokens/s) and Agent.score with backward (scored tokens/s).

Fake 96x96 images, a long Sokoban prompt (its length is the table's prompt tok; train.py's prompts are 26),
exactly `--new-tokens` generated tokens per row (forced with min_new_tokens, since a random-init model emits EOS
at once). Median of `--repeats` runs
after one warm-up. Usage: python scripts/bench_agent.py [--sizes tiny,small] [--batches 1,16]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from agent import Agent  # noqa: E402

PROMPT = ("You are playing Sokoban on a 6x6 grid. Push every box onto a target. Walls are dark, boxes are "
          "brown, targets are red, you are green. Legal actions: up, down, left, right. Answer in JSON: "
          '{"thoughts": "...", "action": "..."}')
ANSWER = '{"thoughts":"player 2,4 box 2,2 target 2,1 push left now so left.","action":"left"}'


def timed(fn, repeats, device="cpu"):
    """Median seconds of fn after one warm-up; on CUDA the clock waits for the queued kernels."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()   # warm-up
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=45)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, {args.dtype}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("| size | params | batch | prompt tok | sample: gen tok/s | score+backward: gen tok/s | (all seq tok/s) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        agent = Agent.build(size, [PROMPT, ANSWER], seed=0, device=args.device, dtype=dtype)
        for B in map(int, args.batches.split(",")):
            imgs = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(B)]
            prompts = [PROMPT] * B
            n = args.new_tokens
            batch = agent.sample(imgs, prompts, min_new_tokens=n, max_new_tokens=n)
            t_sample = timed(lambda: agent.sample(imgs, prompts, min_new_tokens=n, max_new_tokens=n), args.repeats,
                             args.device)

            def score_step():
                logp, values, _ = agent.score(batch)
                (logp.sum() + values.sum()).backward()
                agent.model.zero_grad(set_to_none=True)
            t_score = timed(score_step, args.repeats, args.device)
            G = int(batch.gen_mask.sum())
            print(f"| {size} | {agent.num_params() / 1e6:.2f}M | {B} | {batch.prompt_len} | "
                  f"{B * n / t_sample:,.0f} | {G / t_score:,.0f} | {batch.input_ids.numel() / t_score:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
