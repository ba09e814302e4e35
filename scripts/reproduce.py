"""Reproduce the paper's comparison at laptop scale (docs/method.md section 5), then compare the runs.

    python scripts/reproduce.py            # sokoban + points24, 3 seeds, 7 rows: about 15 process-hours
    python scripts/reproduce.py --quick    # sokoban, 1 seed, short budgets: minutes
    python scripts/reproduce.py --dry-run  # print the commands only

Rows (equal env-step budgets for the RL methods): ppo, gtr, turbo-sft, turbo-kl, turbo-kl --teacher static,
turbo-kl --merge linear, and sft alone for the same wall-clock as that seed's turbo-kl RL loop (--budget-by
time). Every run reuses the same cached SFT warm-up per (task, seed), so all rows start from the same model.
Runs already finished (eval.json present) are skipped and a run killed midway is resumed from its last
checkpoint (train.py --resume, with --train-args' --threads and --device), so an interrupted reproduction
continues where it stopped. Ends with `eval.py compare` per task: docs/results_<task>.md and
docs/curves_<task>.png, named results_<task>_quick.md under --quick and results_<task>_s1-2.md under
--seed-list 1,2, so a short or partial reproduction never replaces the full table.

Processes side by side must not oversubscribe the cores: keep threads x processes <= cores (torch's default
is every core, so pass --threads). Reproductions side by side, one thread and one seed list each:
    python scripts/reproduce.py --tasks sokoban --seed-list 1 --train-args '--threads 1' &
    python scripts/reproduce.py --tasks sokoban --seed-list 2 --train-args '--threads 1'
then one table of both: python eval.py compare runs/reproduce/sokoban-*-s[12] --table docs/results_sokoban.md
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [("ppo", "ppo", []), ("gtr", "gtr", []), ("turbo-sft", "turbo-sft", []), ("turbo-kl", "turbo-kl", []),
        ("turbo-kl-static", "turbo-kl", ["--teacher", "static"]),   # ablation: the SFT model as the teacher
        ("turbo-kl-linear", "turbo-kl", ["--merge", "linear"])]      # claim (e): TIES against a plain average
# Points24 is scored as in the paper, on fresh deals of the game's own distribution: only 715 hands exist, so a
# held-out hand asks for arithmetic on cards the small model never combined in training.
TASK_ARGS = {"points24": ["--eval-split", "train"]}


def run(cmd, dry):
    print("$", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def where(train_args):
    """The flags of train_args that a resumed run may take: where it runs, not what it learns."""
    keep = []
    for i, x in enumerate(train_args):
        name = x.split("=")[0]
        if name in ("--threads", "--device"):
            keep += [x] if "=" in x else train_args[i:i + 2]
    return keep


def train(out, cmd, dry, resume_args=()):
    """Run `cmd` unless `out` is finished; resume it if a killed run left its args.json there."""
    if os.path.isfile(os.path.join(ROOT, out, "eval.json")):
        return
    if os.path.isfile(os.path.join(ROOT, out, "args.json")):
        # the saved args.json holds the rest (no checkpoint: starts over)
        cmd = ["train.py", "--resume", out, *resume_args]
    run(cmd, dry)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="sokoban only, 1 seed, 1024 env turns, 30 eval episodes")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default sokoban,points24; --quick: sokoban)")
    p.add_argument("--seeds", type=int, default=0, help="seeds per row (default 3; --quick: 1)")
    p.add_argument("--seed-list", default="", help="comma-separated seeds to run, e.g. '2,3' (overrides --seeds)")
    p.add_argument("--root", default="runs/reproduce", help="where the runs go")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. '--threads 1'")
    a = p.parse_args()
    tasks = a.tasks.split(",") if a.tasks else (["sokoban"] if a.quick else ["sokoban", "points24"])
    n_seeds = a.seeds or (1 if a.quick else 3)
    try:
        seeds = [int(s) for s in a.seed_list.split(",")] if a.seed_list else range(1, 1 + n_seeds)
    except ValueError:
        p.error(f"--seed-list: comma-separated integers, got {a.seed_list!r}")
    if not seeds:
        p.error(f"--seeds must be positive, got {a.seeds}")
    budget = ["--total-steps", "1024", "--eval-episodes", "30"] if a.quick else []  # else train.py's defaults
    budget += a.train_args.split()
    resume_args = where(a.train_args.split())  # a resumed run keeps the rest of its args.json
    for task in tasks:
        dirs = []
        task_args = budget + TASK_ARGS.get(task, [])
        for seed in seeds:
            for name, method, extra in ROWS:
                out = os.path.join(a.root, f"{task}-{name}-s{seed}")
                dirs.append(out)
                train(out, ["train.py", "--task", task, "--method", method, "--seed", str(seed), "--out", out,
                            *task_args, *extra], a.dry_run, resume_args)
            out = os.path.join(a.root, f"{task}-sft-s{seed}")
            dirs.append(out)
            ref = os.path.join(ROOT, a.root, f"{task}-turbo-kl-s{seed}", "metrics.jsonl")
            seconds = json.loads(open(ref).readlines()[-1])["charts/wall_time"] if os.path.isfile(ref) else 0
            train(out, ["train.py", "--task", task, "--method", "sft", "--seed", str(seed), "--out", out, *task_args,
                        "--budget-by", "time", "--budget-seconds", f"{seconds or 1:.0f}"], a.dry_run, resume_args)
        tag = ("_quick" if a.quick else "") + (f"_s{'-'.join(map(str, seeds))}" if a.seed_list else "")
        run(["eval.py", "compare", *dirs, "--out", f"docs/curves_{task}{tag}.png", "--table",
             f"docs/results_{task}{tag}.md"], a.dry_run)


if __name__ == "__main__":
    main()
