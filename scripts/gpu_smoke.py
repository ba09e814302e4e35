"""GPU smoke check of the real-model path: a tiny Qwen2.5-VL written by plain `save_pretrained` trains through
train.py on CUDA the way a local Qwen2.5-VL checkpoint would, resumes, and evaluates with eval.py.

    python scripts/gpu_smoke.py [--device cuda] [--workdir NEW_DIR]   # default: a fresh temporary directory

Cases (GridWorld, 2 updates of 4 envs x 4 turns each): turbo-kl with LoRA r=8, turbo-kl with full
fine-tuning, turbo-sft with LoRA, gtr with LoRA; then the first run is extended by 2 updates with --resume and
evaluated with `eval.py run`. Prints one line per case and exits 1 if any failed. A random-init model writes no
valid answer, so success stays 0: this checks the plumbing (devices, dtypes, LoRA, checkpoints), not learning.
`--device cpu` runs the same on a machine without a GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default="", help="an empty or new directory (default: a fresh temp directory)")
    a = p.parse_args()
    if a.workdir and os.path.isdir(a.workdir) and os.listdir(a.workdir):
        p.error(f"--workdir {a.workdir} is not empty: train.py never overwrites a run; give a new directory")
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="gtr-gpu-smoke-")
    from agent import Agent
    from distill import tokenizer_corpus
    model_dir = os.path.join(a.workdir, "qwen")
    tiny = Agent.build("tiny", tokenizer_corpus(0, episodes_per_task=8), seed=0)
    tiny.model.save_pretrained(model_dir)  # what a real checkpoint directory holds: model + processor files
    tiny.processor.save_pretrained(model_dir)
    common = ["--task", "gridworld", "--model", model_dir, "--device", a.device, "--num-envs", "4",
              "--num-steps", "4", "--total-steps", "32", "--ppo-epochs", "1", "--minibatch", "8",
              "--max-new-tokens", "24", "--eval-episodes", "4"]
    cases = [("turbo-kl-lora", ["--method", "turbo-kl", "--lora-rank", "8"]),
             ("turbo-kl-full", ["--method", "turbo-kl"]),
             ("turbo-sft-lora", ["--method", "turbo-sft", "--lora-rank", "8"]),
             ("gtr-lora", ["--method", "gtr", "--lora-rank", "8"])]
    failed = 0

    def run(name, cmd):
        nonlocal failed
        t0 = time.time()
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        print(f"{name}: exit {r.returncode} in {time.time() - t0:.1f} s", flush=True)
        if r.returncode:
            failed += 1
            print(r.stderr[-2000:])
        return r

    for name, extra in cases:
        run(name, ["train.py", *common, *extra, "--out", os.path.join(a.workdir, name)])
    first = os.path.join(a.workdir, cases[0][0])
    if os.path.isfile(os.path.join(first, "args.json")):  # a resumed run may raise its budget
        run("resume +2 updates", ["train.py", "--resume", first, "--total-steps", "64"])
        lines = len(open(os.path.join(first, "metrics.jsonl")).read().splitlines())
        print(f"metrics lines after resume: {lines} (expected 4)")
        failed += lines != 4
        run("eval.py run", ["eval.py", "run", first, "--episodes", "8", "--device", a.device])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
