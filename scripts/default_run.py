"""Benchmark of the product's main command: `python train.py --task sokoban`, timed end to end.

    python scripts/default_run.py [--fresh] [-- extra train.py flags]

Runs the command exactly as README gives it (plus any extra flags; --out runs/default-run-<time> unless given,
since train.py refuses to overwrite a run), from the repository root, and prints
one table: wall-clock of the whole command, of the SFT warm-up and of the RL loop, and held-out success
of the SFT start, the final agent and its merged teacher (from the run's eval.json). --fresh deletes the
cached SFT model first, so the warm-up is timed too (what a first-time user sees).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fresh", action="store_true", help="delete runs/sft-cache/sokoban-* first")
    p.add_argument("extra", nargs="*", help="extra train.py flags (after --)")
    a = p.parse_args()
    if a.fresh:
        for d in glob.glob(os.path.join(ROOT, "runs", "sft-cache", "sokoban-*")):
            shutil.rmtree(d)
    q = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --out as train.py's parser reads it
    q.add_argument("--out")
    out = q.parse_known_args(a.extra)[0].out  # the last one wins; "--out DIR" or "--out=DIR"
    extra = list(a.extra)
    if out is None:  # train.py never overwrites a run: each benchmark gets its own directory
        out = os.path.join("runs", time.strftime("default-run-%Y%m%d-%H%M%S"))
        extra += ["--out", out]
    cmd = [sys.executable, "train.py", "--task", "sokoban", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    total = time.time() - t0
    run = os.path.join(ROOT, out)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    path = os.path.join(run, "eval.json")  # absent under --eval-episodes 0
    ev = json.load(open(path)) if os.path.isfile(path) else {}
    rl = rows[-1]["charts/wall_time"]
    print("\n| item | value |\n|---|---|")
    print(f"| whole command | {total / 60:.1f} min |")
    print(f"| RL loop ({rows[-1]['update']} updates, {rows[-1]['env_steps']} env turns) | {rl / 60:.1f} min |")
    print(f"| SFT warm-up + evaluations + start-up | {(total - rl) / 60:.1f} min |")
    for name, r in ev.items():
        print(f"| held-out success, {name} ({r['episodes']} episodes) | {r['success']:.2f} |")


if __name__ == "__main__":
    main()
