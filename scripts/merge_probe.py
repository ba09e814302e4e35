"""Which merge of the agent's own checkpoints makes the best teacher? One run's history, many merges.

    python scripts/merge_probe.py --seed 1 [--episodes 300] [-- train.py flags]
    python scripts/merge_probe.py --seed 1 --tag sma -- --weighting sma   # the history of an SMA-taught run

Run it from the repository root (runs/ and the SFT cache are relative to it). Step 1 runs train.py unchanged
(its flags after `--`) into runs/merge-probe-s<seed>[-<tag>]/ and keeps every checkpoint the merge history
receives in history/ (a killed run resumes; a finished one is reused). Step 2 builds teachers from that history
the way merge.py does (train.py's running SMA and EMA; one TIES or linear merge over the whole history or its
last K checkpoints) and scores the final agent and each teacher on the same held-out levels with the same
sampling seed, as train.py's final evaluation does (T as trained, bf16 autocast). A teacher that is nearly the
agent then plays nearly the same episodes, so a difference between two rows is sharper than each row's
standard error (about 2.6 points at 300 episodes) suggests. Prints one markdown table.
"""
import argparse
import glob
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import merge  # noqa: E402
import train  # noqa: E402


class KeepingHistory(merge.MergeHistory):
    """MergeHistory that also writes each checkpoint it is given (and the base) to `folder`."""
    folder = None

    def __init__(self, base, **kw):
        super().__init__(base, **kw)
        os.makedirs(self.folder, exist_ok=True)
        torch.save(self.base, os.path.join(self.folder, "base.pt"))

    def load_state_dict(self, sd):
        """A resumed run: the base is the saved history's (the SFT start), not the resumed agent given to
        __init__; base.pt is rewritten from it."""
        super().load_state_dict(sd)
        torch.save(self.base, os.path.join(self.folder, "base.pt"))

    def add(self, states):
        states = [states] if isinstance(states, dict) else list(states)
        for i, s in enumerate(states):
            torch.save(s, os.path.join(self.folder, f"{self.count + i + 1:04d}.pt"))
        super().add(states)  # exactly as train.py's history would


def candidates(base, hist, density, per_update):
    """name -> a function that returns the teacher's trainable state. per_update: checkpoints per update (train.py's
    --ppo-epochs), which the running merges fold in together, as train.py does."""
    def tau(s):
        return {k: s[k].float() - base[k].float() for k in base}

    def state(t):
        return {k: (base[k].float() + t[k]).to(base[k].dtype) for k in base}

    def running(mode, method, alpha=0.5):
        h = merge.MergeHistory(base, mode=mode, alpha=alpha, method=method, density=density)
        for i in range(0, len(hist), per_update):
            h.add(hist[i:i + per_update])
        return h.teacher_state()

    def one(fn, k):
        part = hist[-k:]
        return state(fn([tau(s) for s in part], [1.0] * len(part)))

    ties = lambda deltas, w: merge.ties_merge(deltas, w, density)  # noqa: E731
    return {
        "agent (last checkpoint)": lambda: hist[-1],
        "running SMA, TIES": lambda: running("sma", "ties"),
        "running SMA, linear": lambda: running("sma", "linear"),
        "running EMA 0.5, TIES": lambda: running("ema", "ties"),
        "running EMA 0.5, linear": lambda: running("ema", "linear"),
        "running EMA 0.2, linear": lambda: running("ema", "linear", 0.2),
        "one TIES, whole history": lambda: one(ties, len(hist)),
        "one TIES, last 10": lambda: one(ties, 10),
        "one TIES, last 5": lambda: one(ties, 5),
        "linear, last 10": lambda: one(merge.linear_merge, 10),
        "linear, last 5": lambda: one(merge.linear_merge, 5),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--episodes", type=int, default=300, help="held-out episodes per row")
    p.add_argument("--tag", default="", help="suffix of the run directory, to keep probes of other flags apart")
    p.add_argument("train_flags", nargs="*", help="train.py flags, after --")
    a = p.parse_args()
    if a.episodes < 1:
        p.error(f"--episodes must be >= 1, got {a.episodes}")
    out = os.path.join("runs", f"merge-probe-s{a.seed}" + (f"-{a.tag}" if a.tag else ""))
    started = os.path.exists(os.path.join(out, "args.json"))  # then its own args.json decides every flag
    args = train.parse_args(["--resume", out] if started else ["--seed", str(a.seed), *a.train_flags, "--out", out])
    KeepingHistory.folder = os.path.join(out, "history")
    if not os.path.isfile(os.path.join(out, "eval.json")):
        train.MergeHistory = KeepingHistory  # the one change: the merge history also writes what it receives
        train.main(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    base = torch.load(os.path.join(KeepingHistory.folder, "base.pt"))
    hist = [torch.load(f) for f in sorted(glob.glob(os.path.join(KeepingHistory.folder, "[0-9]*.pt")))]
    model = train.load_init_agent(os.path.join(out, "ckpt", "agent"), args)
    rows = []
    for name, make in candidates(base, hist, args.density, args.ppo_epochs).items():
        s = make()
        model.load_trainable_state(s)
        r = train.held_out(model, args, a.episodes, desc=name)
        size = sum(((s[k].float() - base[k].float()) ** 2).sum() for k in base).sqrt().item()
        rows.append((name, r["success"], r["grounding"], size))
    agent = rows[0][1]
    print(f"\n{len(hist)} checkpoints of {out}, {a.episodes} held-out episodes per row (seed {a.seed})\n")
    print("| teacher | success | minus agent | grounding | norm of theta - theta_0 |")
    print("|---|---|---|---|---|")
    for name, success, grounding, size in rows:
        print(f"| {name} | {success:.3f} | {success - agent:+.3f} | {grounding:.3f} | {size:.3f} |")


if __name__ == "__main__":
    main()
