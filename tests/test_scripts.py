"""scripts/: the reproduction plan (`--dry-run` runs nothing) and the signal probe (a smoke run)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))  # tests import scripts by name, scripts their siblings

from test_train import share_sft_cache, tiny_agent  # noqa: E402


def test_reproduce_quick_plan(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--quick", "--dry-run",
                          "--root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60, check=True)
    cmds = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ ")]
    train = [c for c in cmds if c[0] == "train.py"]
    flag = lambda c, f: c[c.index(f) + 1] if f in c else None  # noqa: E731
    # seven rows on one seed: five methods and the two turbo-kl ablations of claims (e) and the static teacher
    assert sorted(flag(c, "--method") for c in train) == ["gtr", "ppo", "sft", "turbo-kl", "turbo-kl", "turbo-kl",
                                                          "turbo-sft"]
    assert {flag(c, "--teacher") for c in train} == {None, "static"}
    assert {flag(c, "--merge") for c in train} == {None, "linear"}
    rl = [c for c in train if flag(c, "--method") != "sft"]
    assert {flag(c, "--total-steps") for c in rl} == {"1024"}  # equal env-step budgets
    sft = next(c for c in train if flag(c, "--method") == "sft")
    assert flag(sft, "--budget-by") == "time"  # the SFT baseline gets turbo-kl's wall-clock instead
    assert len({flag(c, "--out") for c in train}) == 7 and not os.path.exists(tmp_path / "runs")
    assert cmds[-1][:2] == ["eval.py", "compare"] and len(cmds) == 8
    # a quick or partial reproduction writes tables of its own: the committed full ones stay
    assert flag(cmds[-1], "--table") == "docs/results_sokoban_quick.md"
    assert flag(cmds[-1], "--out") == "docs/curves_sokoban_quick.png"


def test_signal_probe_prints_one_line_per_update(tmp_path):
    """Oracle advantages on a tiny GridWorld agent: the probe runs train.py's own loop and reports rates."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "signal_probe.py"), "--adv", "oracle",
                          "--updates", "2", "--probe-states", "8", "--", "--task", "gridworld", "--model", "tiny",
                          "--sft-steps", "5", "--num-envs", "4", "--num-steps", "4", "--minibatch", "8",
                          "--max-new-tokens", "24"],
                         cwd=share_sft_cache(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["update"] for r in rows] == [0, 1, 2] and rows[-1]["env_steps"] == 32
    assert all(0.0 <= r["optimal_move_rate"] <= 1.0 for r in rows)  # 16 samples each: a share, k / 16
    assert all(abs(r["optimal_move_rate"] * 16 - round(r["optimal_move_rate"] * 16)) < 1e-9 for r in rows)
    # GridWorld's critic is the image critic, as in train.py: refit after update 1, it values update 2's turns (with
    # no critic V = 0 and the explained variance is exactly 0)
    assert rows[-1]["critic_ev"] != 0.0


def test_signal_probe_evaluation_leaves_trainings_random_numbers_alone():
    import torch
    import signal_probe as probe
    import train
    from env import LockstepEnvs
    agent = tiny_agent()
    envs = LockstepEnvs("gridworld", 4, seed=0, split="eval")
    images, prompts = envs.observe()
    args = train.Args(task="gridworld", model="tiny", max_new_tokens=8, bf16=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rates = [probe.optimal_move_rate(agent, envs, images, prompts, envs.optimal_actions(), args, seed=5)
             for _ in range(2)]
    assert torch.equal(torch.rand(3), expected) and rates[0] == rates[1]


def test_merge_probe_keeps_the_sft_start_as_base_when_a_run_resumes(tmp_path, monkeypatch):
    import torch
    import merge
    import merge_probe as probe
    monkeypatch.setattr(probe.KeepingHistory, "folder", str(tmp_path / "history"))
    sft, resumed = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    saved = merge.MergeHistory(sft)
    saved.add({"w": torch.full((3,), 0.5)})
    history = probe.KeepingHistory(resumed)   # train.py builds it from the resumed agent, then loads the saved one
    history.load_state_dict(saved.state_dict())
    assert torch.equal(torch.load(tmp_path / "history" / "base.pt")["w"], sft["w"])


def test_reproduce_skips_finished_and_resumes_killed_runs(tmp_path):
    """A finished run (eval.json) is not redone; a killed one (args.json, no eval.json) is resumed."""
    root = tmp_path / "runs"
    (root / "sokoban-ppo-s2").mkdir(parents=True)
    (root / "sokoban-ppo-s2" / "eval.json").write_text("{}")
    (root / "sokoban-gtr-s2").mkdir(parents=True)
    (root / "sokoban-gtr-s2" / "args.json").write_text("{}")  # train.py refuses a new run over it
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--tasks", "sokoban",
                          "--seed-list", "2", "--dry-run", "--root", str(root)],
                         capture_output=True, text=True, timeout=60, check=True)
    train = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ train.py")]
    outs = [c[c.index("--out") + 1] if "--out" in c else None for c in train]
    assert train[0] == ["train.py", "--resume", str(root / "sokoban-gtr-s2")]  # ppo skipped, gtr resumed
    compare = next(line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ eval.py compare"))
    assert compare[compare.index("--table") + 1] == "docs/results_sokoban_s2.md"
    assert len(train) == 6 and all(o.endswith("-s2") for o in outs[1:])  # the other five rows, seed 2 only
    assert not any("sokoban-ppo-s2" in " ".join(c) for c in train)


def test_reproduce_scores_points24_on_the_training_distribution(tmp_path):
    """Points24 rows are evaluated on fresh training-distribution deals (the paper's protocol); Sokoban's on
    held-out levels (train.py's default)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--seed-list", "1",
                          "--dry-run", "--root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60,
                         check=True)
    train = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("$ train.py")]
    split = {c[c.index("--task") + 1]: set() for c in train}
    for c in train:
        split[c[c.index("--task") + 1]].add(c[c.index("--eval-split") + 1] if "--eval-split" in c else None)
    assert split == {"sokoban": {None}, "points24": {"train"}} and len(train) == 14


def test_signal_probe_warm_up_scales_each_step_linearly():
    """warm_up(opt, 4): steps 1..5 run at 1/4, 2/4, 3/4, 1, 1 of the scheduled lr. With plain SGD on the
    loss w (gradient 1), the weight after k steps is 1 - lr * sum of those factors: worked by hand."""
    import torch
    import signal_probe as probe
    w = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([w], lr=0.1)
    opt.param_groups[0]["scheduled"] = 0.1
    probe.warm_up(opt, 4)
    seen = []
    for _ in range(5):
        opt.zero_grad()
        w.backward()
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert abs(w.item() - (1 - 0.1 * (0.25 + 0.5 + 0.75 + 1 + 1))) < 1e-6  # 0.65


def test_readme_names_real_functions_and_flags():
    """Every `module.name` the README's map and walkthrough cite exists, and every train.py flag it names is one."""
    import re
    import train
    readme = open(os.path.join(ROOT, "README.md")).read()
    names = set(re.findall(r"`((?:env|agent|merge|distill|train|eval|Agent|Batch)\.[A-Za-z_*][\w.*]*)`", readme))
    names = {n for n in names if not n.endswith(".py")}  # file names, not functions
    assert len(names) > 30
    import agent  # noqa: F401  (the Agent / Batch prefixes)
    missing = []
    for name in names:
        head, *rest = name.split(".")
        obj = getattr(sys.modules["agent"], head) if head in ("Agent", "Batch") else __import__(head)
        for part in rest:
            if part == "*":  # env.*.method: every env class
                obj = __import__("env").SokobanEnv
            elif part in getattr(obj, "__dataclass_fields__", {}):
                obj = None
            elif obj is not None:
                obj = getattr(obj, part, missing)
        if obj is missing:
            missing.append(name)
    assert not missing
    flags = {"--help"} | {"--" + f.replace("_", "-") for f in train.Args.__dataclass_fields__}
    cited = set(re.findall(r"python train\.py[^\n`]*", readme))
    used = {f for line in cited for f in re.findall(r"--[a-z][a-z0-9-]*", line)}
    assert used and used <= flags, used - flags


def test_merge_probe_keeps_the_history_train_py_merged(tmp_path):
    """The probe's saved history is what train.py merged: its last checkpoint is the saved agent, and train.py's
    running EMA-TIES rebuilt from the saved files (by hand and by the probe itself) is, to the bit, the saved teacher.
    Then every merge is scored."""
    import importlib.util

    import torch
    from agent import Agent
    from merge import MergeHistory
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "merge_probe.py"), "--episodes", "1", "--",
                          "--task", "gridworld", "--model", "tiny", "--sft-steps", "5", "--num-envs", "4",
                          "--num-steps", "4", "--minibatch", "8", "--total-steps", "32", "--ppo-epochs", "2",
                          "--max-new-tokens", "12", "--eval-episodes", "1", "--threads", "1"],
                         cwd=share_sft_cache(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "merge-probe-s1"
    files = sorted((run / "history").glob("0*.pt"))
    assert [f.name for f in files] == ["0001.pt", "0002.pt", "0003.pt", "0004.pt"]  # 2 updates x 2 epochs
    hist = [torch.load(f) for f in files]
    agent, teacher = (Agent.load(str(run / "ckpt" / who)).trainable_state() for who in ("agent", "teacher"))
    assert all(torch.equal(hist[-1][k], agent[k]) for k in agent)
    h = MergeHistory(torch.load(run / "history" / "base.pt"), mode="ema", alpha=0.5, method="ties", density=0.8)
    h.add(hist[:2])
    h.add(hist[2:])
    rebuilt = h.teacher_state()
    assert all(torch.equal(rebuilt[k], teacher[k]) for k in teacher)
    assert not all(torch.equal(agent[k], teacher[k]) for k in teacher)  # EMA: not the last checkpoint itself
    spec = importlib.util.spec_from_file_location("merge_probe", os.path.join(ROOT, "scripts", "merge_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    made = probe.candidates(torch.load(run / "history" / "base.pt"), hist, 0.8, 2)  # the probe's own teacher row
    assert all(torch.equal(made["running EMA 0.5, TIES"]()[k], teacher[k]) for k in teacher)
    table = out.stdout.split("4 checkpoints of")[1].splitlines()  # after train.py's own table
    rows = [line.split("|")[1:-1] for line in table if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 11 and rows[0][0].strip() == "agent (last checkpoint)" and rows[0][2].strip() == "+0.000"


def test_critic_ceiling_statistics_by_hand(tmp_path):
    """Four states, two returns each: G = [1,3], [1,3], [5,7], [5,7]. Var(G) = 5 (mean 4). State means 2,2,6,6
    have variance 4; the within-state variance is 2 (ddof 1), so Var(V^pi) = 4 - 2/2 = 3 and the ceiling is 3/5.
    A V equal to the state means leaves residuals of +-1 (EV 1 - 1/5); a constant V explains nothing. Lengths
    2,2,4,4 predict each state by its twin's mean (EV 0.8); lengths 2,4,2,4 pair each state with one of the
    other mean, residuals -5,-3 / 3,5 (variance 17, EV 1 - 17/5). Then the script itself runs on a tiny agent."""
    import importlib.util
    import numpy as np
    spec = importlib.util.spec_from_file_location("critic_ceiling", os.path.join(ROOT, "scripts", "critic_ceiling.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    G = np.array([[1.0, 3.0], [1.0, 3.0], [5.0, 7.0], [5.0, 7.0]])
    r = probe.ceiling_stats(G, np.array([2, 2, 4, 4]), np.array([2.0, 2.0, 6.0, 6.0]))
    assert r["return_var"] == pytest.approx(5.0) and r["ceiling_ev"] == pytest.approx(0.6)
    assert r["value_head_ev"] == pytest.approx(0.8) and r["solution_length_ev"] == pytest.approx(0.8)
    r = probe.ceiling_stats(G, np.array([2, 4, 2, 4]), np.array([9.0, 9.0, 9.0, 9.0]),
                            critic_values=np.array([2.0, 2.0, 6.0, 6.0]))  # an image critic: scored as the head is
    assert r["value_head_ev"] == pytest.approx(0.0) and r["solution_length_ev"] == pytest.approx(1 - 17 / 5)
    assert r["image_critic_ev"] == pytest.approx(0.8)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "critic_ceiling.py"), "--states", "6", "--k",
                          "2", "--", "--task", "gridworld", "--model", "tiny", "--sft-steps", "5", "--num-envs", "4",
                          "--num-steps", "3", "--max-new-tokens", "24"],
                         cwd=share_sft_cache(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["states"] == 6 and row["k"] == 2 and row["ceiling_ev_se"] >= 0
    assert row["return_var"] >= 0 and row["solution_length_ev"] <= 1 and row["value_head_ev"] <= 1


def test_solver_critic_table_by_hand(tmp_path):
    """update_table with alpha 0.5: length 2 first sees targets 1 and 3 (entry 2), then 6 (0.5 x 2 + 0.5 x 6 = 4);
    length -1 (unsolvable) sees -1; an unseen length reads 0. Then the script trains a tiny agent: 2 updates."""
    import importlib.util
    import numpy as np
    spec = importlib.util.spec_from_file_location("solver_critic", os.path.join(ROOT, "scripts", "solver_critic.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    table = {}
    probe.update_table(table, np.array([2, 2, -1]), np.array([1.0, 3.0, -1.0]), 0.5)
    probe.update_table(table, np.array([[2]]), np.array([[6.0]]), 0.5)
    assert table == {2: 4.0, -1: -1.0}
    assert probe.table_values(table, np.array([[2, 5], [-1, 2]])).tolist() == [[4.0, 0.0], [-1.0, 4.0]]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "solver_critic.py"), "--task", "gridworld",
                          "--model", "tiny", "--sft-steps", "5", "--num-envs", "4", "--num-steps", "4", "--minibatch",
                          "8", "--total-steps", "32", "--max-new-tokens", "24", "--eval-episodes", "2", "--out", "run"],
                         cwd=share_sft_cache(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["update"] for r in rows] == [1, 2] and rows[0]["losses/explained_variance"] == 0.0  # V = 0 at first
    assert "V by solution length:" in out.stdout


def test_loop_bench_reports_the_median_of_alternating_rounds(capsys):
    """Rounds of (old, new) rows: each round's ratio, then their median (3.0, 2.0, 2.5 -> 2.50x; the ratio of the
    pooled rates would be 95 / 40 = 2.38x)."""
    import bench
    split = dict.fromkeys(("generate", "scoring", "teacher", "ppo", "env"), 0.0)
    rate = lambda r: {"bf16": "on", "tokens_per_answer": 27, "turns_per_s": r, "wall_per_update": 512 / r,  # noqa: E731
                      "seconds_per_update": split}
    rows = [(t, rate(r)) for pair in ((10, 30), (20, 40), (10, 25)) for t, r in zip(("old", "new"), pair)]
    bench.print_loop(rows)
    out = capsys.readouterr().out
    assert [line.split("|")[5].strip() for line in out.splitlines() if "new / old" in line] == \
        ["3.00x", "2.00x", "2.50x", "2.50x"]


def test_loop_bench_refuses_bad_settings_before_it_runs_anything():
    # the first update warms up and the rate is over the others: one update would divide by zero minutes later
    for script, argv, needle in (
            ("bench.py", ["--only", "loop", "--loop-updates", "1"], "updates must be >= 2"),
            ("bench_loop.py", ["--root", ROOT, "--threads", "1", "--updates", "1", "--bf16", "off"],
             "updates must be >= 2"),
            ("bench.py", ["--only", "loop", "--loop-base", "nosuchcommit"], "nosuchcommit: no such commit")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *argv], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr.splitlines()[-1], (script, r.stderr)
