"""The reproduction script's plan (issue 8): `--dry-run` prints every command it would run, runs nothing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reproduce_quick_plan(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--quick", "--dry-run",
                          "--root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60, check=True)
    cmds = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ ")]
    train = [c for c in cmds if c[0] == "train.py"]
    flag = lambda c, f: c[c.index(f) + 1] if f in c else None  # noqa: E731
    # seven rows on one seed: five methods and the two turbo-kl ablations of claims (e) and the static teacher
    assert sorted(flag(c, "--method") for c in train) == ["gtr", "ppo", "sft", "turbo-kl", "turbo-kl", "turbo-kl",
                                                          "turbo-sft"]
    assert {flag(c, "--teacher") for c in train} == {None, "static"} and {flag(c, "--merge") for c in train} == {None, "linear"}
    rl = [c for c in train if flag(c, "--method") != "sft"]
    assert {flag(c, "--total-steps") for c in rl} == {"1024"}  # equal env-step budgets
    sft = next(c for c in train if flag(c, "--method") == "sft")
    assert flag(sft, "--budget-by") == "time"  # the SFT baseline gets turbo-kl's wall-clock instead
    assert len({flag(c, "--out") for c in train}) == 7 and not os.path.exists(tmp_path / "runs")
    assert cmds[-1][:2] == ["eval.py", "compare"] and len(cmds) == 8
