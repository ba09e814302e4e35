"""eval.py: diversity metrics by hand, the solver/random reference agents on held-out levels, labelled GIF
frames, and the CLI (`run` and `compare` on two tiny runs, bad input) run as a script."""
import json
import math
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as E  # noqa: E402
from test_train import share_sft_cache  # noqa: E402

# one thread: on a loaded 2-core machine two torch threads per process are many times slower, not faster
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run_script(script, *argv, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# Diversity metrics against arithmetic done by hand


def test_distinct2_by_hand():
    # "a b a b" -> bigrams ab, ba, ab; "a b c" -> ab, bc: 5 bigrams, 3 distinct (ab, ba, bc) -> 3/5
    assert math.isclose(E.distinct_n(["a b a b", "a b c"], 2), 0.6)
    # identical texts: 2 bigrams (xy twice), 1 distinct -> 1/2; no bigram at all -> 0
    assert math.isclose(E.distinct_n(["x y", "x y"], 2), 0.5)
    assert E.distinct_n(["one", ""], 2) == 0.0


def test_self_bleu2_by_hand():
    # hyp "a b a b" vs ref "a b c": unigrams a2 b2 clipped to a1 b1 -> 2/4; bigrams ab2 ba1 clipped to ab1 -> 1/3;
    #   hyp longer than ref -> BP 1;  BLEU = sqrt(1/2 * 1/3) = sqrt(1/6)
    # hyp "a b c" vs ref "a b a b": unigrams a b (c unmatched) -> 2/3; bigrams ab (bc unmatched) -> 1/2;
    #   hyp 3 < ref 4 -> BP exp(1 - 4/3);  BLEU = exp(-1/3) * sqrt(2/3 * 1/2)
    expected = (math.sqrt(1 / 6) + math.exp(-1 / 3) * math.sqrt(1 / 3)) / 2  # = 0.41097
    assert math.isclose(E.self_bleu2(["a b a b", "a b c"]), expected, rel_tol=1e-9)
    # "a b" twice and "c d": each "a b" finds itself among the references -> 1; "c d" shares no word -> 0
    assert math.isclose(E.self_bleu2(["a b", "a b", "c d"]), 2 / 3, rel_tol=1e-9)
    assert E.self_bleu2(["same words here"] * 5) == 1.0
    # the reference length closest to the hypothesis', the shorter on a tie: "a b c" (refs of 2 and 4 words) BP 1;
    # "a b" (refs of 3 and 4) BP e^(1 - 3/2), precisions 1; "a b c d": 3/4 and 2/3, BP 1
    expected = (1 + math.exp(-0.5) + math.sqrt(3 / 4 * 2 / 3)) / 3
    assert math.isclose(E.self_bleu2(["a b c", "a b", "a b c d"]), expected, rel_tol=1e-9)
    assert math.isnan(E.self_bleu2(["only one"]))


# ----------------------------------------------------------------------------------------------------------
# Reference agents on held-out levels


@pytest.mark.parametrize("task", ["sokoban", "gridworld"])
def test_expert_solves_every_held_out_level_and_random_does_not(task):
    rows = E.reference_rows(task, episodes=30, seed=0)
    expert, rnd = rows["expert"], rows["random"]
    assert expert["episodes"] == rnd["episodes"] == 30
    assert expert["success"] == 1.0 and expert["grounding"] == 1.0 and expert["invalid_rate"] == 0.0
    assert rnd["success"] <= 0.5 and rnd["format_rate"] == 1.0  # random: valid answers, aimless moves
    assert math.isnan(rnd["grounding"])  # an empty thought states no fact


def test_eval_split_train_deals_only_training_levels(capsys):
    """--eval-split train (the paper's Points24 protocol) plays levels from the training side of the crc32 split;
    the default plays only held-out ones; anything else is refused. A progress bar counts the episodes."""
    from env import in_eval_split
    levels = {}
    for split in ("eval", "train"):
        eps, _ = E.play(E.expert_actor, "points24", 24, seed=0, num_envs=8, split=split, desc="eval expert")
        levels[split] = [e["level"] for e in eps]
        assert len(eps) == 24
    assert all(in_eval_split(x) for x in levels["eval"]) and not any(in_eval_split(x) for x in levels["train"])
    err = capsys.readouterr().err
    assert "eval expert" in err and "/24 [" in err  # one bar per play, counting episodes
    with pytest.raises(ValueError, match="split"):
        E.play(E.expert_actor, "points24", 4, seed=0, split="test")


def test_every_actor_meets_the_same_levels_whatever_the_batch():
    """Env i plays levels i, i + num_envs, ...: with fewer envs than episodes, actors whose episodes end at other
    turns (solver, random) still play the levels one env per episode would, episode for episode."""
    levels = lambda actor, n: sorted(e["level"] for e in E.play(actor, "gridworld", 12, seed=0, num_envs=n)[0])
    one_each = levels(E.expert_actor, 12)
    assert len(set(one_each)) == 12
    assert levels(E.expert_actor, 5) == levels(E.random_actor(0), 5) == levels(E.random_actor(0), 3) == one_each


def bfs_length(level: str) -> int:
    """Shortest walk from @ to . in a GridWorld level text (# blocks), written here independently of env.py."""
    rows = level.split("\n")
    cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
    start = next(p for p, ch in cells.items() if ch == "@")
    dist, todo = {start: 0}, deque([start])
    while todo:
        r, c = todo.popleft()
        if cells[(r, c)] == ".":
            return dist[(r, c)]
        for q in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if cells.get(q, "#") != "#" and q not in dist:
                dist[q] = dist[(r, c)] + 1
                todo.append(q)
    raise AssertionError("unsolvable level")


def test_evaluation_samples_from_its_own_seed_and_leaves_the_callers_stream_alone():
    import torch
    torch.manual_seed(0)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    with E.seeded(1, "cpu"):
        a = torch.rand(3)
    after = torch.rand(3)
    with E.seeded(1, "cpu"):
        b = torch.rand(3)
    with E.seeded(2, "cpu"):
        c = torch.rand(3)
    assert torch.equal(after, untouched) and torch.equal(a, b) and not torch.equal(a, c)


def test_expert_replay_gif_has_one_frame_per_turn_plus_the_final_state(tmp_path):
    replays = E.write_replays(E.expert_actor, "gridworld", 2, seed=3, out_dir=str(tmp_path))
    for k, r in enumerate(replays):
        # the expert walks a shortest path: the episode's turns are the BFS distance of its level
        assert r["success"] and r["length"] == bfs_length(r["level"])
        gif = Image.open(tmp_path / f"replay_{k}.gif")
        assert gif.n_frames == r["length"] + 1 == r["frames"]
        assert gif.size[0] >= 96 * E.GIF_SCALE  # the 96x96 GridWorld image scaled 4x, caption below


@pytest.mark.parametrize("task", ["sokoban", "gridworld"])
def test_board_frame_labels_rows_and_columns_so_a_thought_can_be_checked(task):
    """The frame is the board plus the label margins; the labels are drawn there; the cell that the expert's
    thought names for the player ("player R,C") is the player's colour at row R, column C of the picture."""
    from env import PLAYER, draw_grid, make_env, position_facts
    env = make_env(task, split="eval")
    env.reset(seed=4)
    board, frame = env.render_image(scale=E.GIF_SCALE), E.board_frame(env, task)
    assert frame.shape[0] == board.shape[0] + E.LABEL_TOP + E.LEGEND_H
    assert frame.shape[1] == board.shape[1] + E.LABEL_LEFT
    assert (frame[E.LABEL_TOP:, E.LABEL_LEFT:][:board.shape[0]] == board).all()
    side = 16 * E.GIF_SCALE
    white = np.array([255, 255, 255])
    assert (frame[:E.LABEL_TOP, E.LABEL_LEFT:E.LABEL_LEFT + side] != white).any()   # column "0"
    assert (frame[E.LABEL_TOP:E.LABEL_TOP + side, :E.LABEL_LEFT] != white).any()    # row "0"
    assert (frame[E.LABEL_TOP + board.shape[0]:] != white).any()                     # the legend line
    (_, r, c), = [f for f in position_facts(env.expert_answer()) if f[0] == "player"]
    y, x = E.LABEL_TOP + int((r + 0.5) * side), E.LABEL_LEFT + int((c + 0.5) * side)
    assert (frame[y, x] == draw_grid(np.array([[PLAYER]]))[8, 8]).all()  # the player's inner square
    p24 = make_env("points24")
    p24.reset(seed=0)
    assert (E.board_frame(p24, "points24") == p24.render_image(scale=E.GIF_SCALE)).all()  # cards: no grid


# ----------------------------------------------------------------------------------------------------------
# The CLI on two tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("ppo", "turbo-kl"):
        out[method] = base / method
        r = run_script("train.py", "--task", "gridworld", "--model", "tiny", "--sft-steps", "10", "--num-envs", "2",
                       "--num-steps", "4", "--total-steps", "16", "--ppo-epochs", "1", "--minibatch", "8",
                       "--max-new-tokens", "12", "--eval-episodes", "2", "--method", method, "--out", out[method],
                       cwd=share_sft_cache(base))
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_compare_writes_table_and_learning_curve_png(runs, tmp_path):
    png, md = tmp_path / "curves.png", tmp_path / "table.md"
    r = run_script("eval.py", "compare", runs["ppo"], runs["turbo-kl"], "--out", png, "--table", md)
    assert r.returncode == 0, r.stderr[-3000:]
    table = md.read_text()
    body = [line for line in table.splitlines() if line.startswith("| ppo") or line.startswith("| turbo-kl")]
    assert len(body) == 2 and "held-out" in table  # both runs wrote eval.json, so held-out success is used
    # columns: method | seeds | SFT start | success | source | teacher success | ...: read back from eval.json
    # labels carry the settings that differ between the two runs (format_reward's default is per method)
    cells = {line.split("|")[1].split()[0]: [c.strip() for c in line.split("|")[2:-1]] for line in body}
    ev = {method: json.loads((runs[method] / "eval.json").read_text()) for method in runs}
    for method in ("ppo", "turbo-kl"):
        assert cells[method][1] == f"{ev[method]['start (SFT)']['success']:.3f}"
        assert cells[method][2] == f"{ev[method]['agent']['success']:.3f}"
    assert cells["ppo"][4] == "n/a" and cells["turbo-kl"][4] == f"{ev['turbo-kl']['teacher']['success']:.3f}"
    assert table.strip() in r.stdout
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.reshape(-1, 3).std(0).max() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # not blank


def test_eval_run_writes_full_json_and_gif_with_one_frame_per_turn(runs):
    run = runs["turbo-kl"]
    r = run_script("eval.py", "run", run, "--episodes", "2", "--num-envs", "2", "--gif", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    full = json.load(open(run / "eval_full.json"))
    assert set(full["rows"]) == {"agent (T=1)", "agent (greedy)", "teacher (T=1)", "teacher (greedy)", "random",
                                 "expert"}
    assert full["rows"]["expert"]["success"] == 1.0 and full["rows"]["agent (T=1)"]["episodes"] == 2
    assert full["meta"]["max_new_tokens"] == 12  # decoding settings come from the run's args.json
    (replay,) = full["replays"]
    gif = Image.open(run / "replay_0.gif")
    assert gif.n_frames == replay["length"] + 1  # one frame per turn + the final state
    assert 1 <= replay["length"] <= 15 and (replay["success"] or replay["length"] == 15)  # GridWorld max_steps 15


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model is loaded (the agent directories below hold no model at all)


@pytest.fixture
def bad_inputs(tmp_path):
    """Paths the bad-input table fills in: {run} looks like a finished run (empty ckpt/agent), {saved} is one
    whose args.json holds a bad temperature, {notask} one whose args.json names no task, {agent} an empty
    directory, {file} a regular file."""
    paths = {k: tmp_path / k for k in ("run", "saved", "notask", "agent", "norun", "file", "missing")}
    for k, settings in (("run", {"task": "gridworld", "seed": 1}), ("saved", {"task": "gridworld", "temperature": 0}),
                        ("notask", {"seed": 1})):
        (paths[k] / "ckpt" / "agent").mkdir(parents=True)
        (paths[k] / "args.json").write_text(json.dumps(settings))
        (paths[k] / "metrics.jsonl").write_text('{"env_steps": 8, "charts/success_rate": 0.5}\n')
    paths["agent"].mkdir()
    paths["norun"].mkdir()
    paths["file"].write_text("not a directory")
    return {k: str(v) for k, v in paths.items()}


AGENT = "run --agent {agent} --task gridworld "
BAD = [  # (argv, fragments the one line must contain: the flag or path, and the bad value)
    (AGENT + "--episodes abc", ["--episodes", "invalid int value: 'abc'"]),
    (AGENT + "--bogus 3", ["--bogus"]),
    (AGENT + "--seed", ["--seed", "expected one argument"]),
    (AGENT + "--dtype float16", ["--dtype", "float16"]),
    (AGENT + "--max-new-tokens -1", ["--max-new-tokens", "-1"]),
    (AGENT + "--episodes 0", ["--episodes", ">= 1", "got 0"]),
    (AGENT + "--gif -1", ["--gif", ">= 0", "-1"]),
    (AGENT + "--repetition-penalty inf", ["--repetition-penalty", "inf"]),
    (AGENT + "--temperature 0", ["--temperature", "> 0", "got 0"]),
    (AGENT + "--temperature -1e-5", ["--temperature", "-1e-05"]),  # argparse alone reads "-1e-5" as a flag
    (AGENT + "--temperature nan", ["--temperature", "nan"]),
    (AGENT + "--num-envs 0", ["--num-envs", "got 0"]),
    (AGENT + "--out {file}", ["--out", "{file}"]),
    (AGENT + "--device mps", ["--device", "mps"]),
    (AGENT + "--device cuda", ["--device", "0 CUDA devices", "'cuda'"]),  # is_available is patched to False below
    (AGENT + "--eval-split test", ["--eval-split", "test"]),
    ("run --agent {agent}", ["--task is required with --agent", "gridworld, points24, sokoban"]),
    ("--agent {agent} --task gridworld --seed -1", ["--seed", "-1"]),  # no subcommand: `run`
    ("run", ["give a run directory"]),
    ("{run} --agent {agent}", ["not both"]),
    (AGENT, ["{agent}"]),  # passes every check; Agent.load finds no model there
    ("{missing}", ["{missing}", "no such run"]),
    ("{norun}", ["{norun}", "no checkpoint"]),
    ("run {run} --top-k -5", ["--top-k", "-5"]),
    ("{saved}", ["--temperature", "got 0", "{saved}/args.json"]),  # a bad saved value, no flag given
    ("{saved} --temperature 0.5", ["{saved}/ckpt/agent"]),  # the flag wins: only the empty checkpoint is refused
    ("{notask}", ["--task is required", "{notask}/args.json names none"]),
    ("compare {missing}", ["{missing}"]),
    ("compare {run} --out {missing}/c.png", ["--out", "{missing}", "existing directory"]),
    ("compare {run} --table {missing}/t.md", ["--table", "{missing}", "existing directory"]),
    ("compare {run} --out {agent}", ["--out", "{agent}"]),
    ("compare {run} --bogus", ["--bogus"]),
]


@pytest.mark.parametrize("argv,fragments", BAD, ids=[a for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_naming_it(bad_inputs, monkeypatch, capsys, argv, fragments):
    monkeypatch.setattr(E.torch.cuda, "is_available", lambda: False)  # "--device cuda" is bad on any machine
    with pytest.raises(SystemExit) as stop:
        E.main(argv.format(**bad_inputs).split())
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("eval.py: error: "), err
    assert "usage:" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment.format(**bad_inputs) in lines[0], (fragment, lines[0])
    assert not os.path.exists(bad_inputs["missing"])  # nothing created on the way out


def test_a_bare_agent_is_scored_on_its_task_s_own_split_unless_told(tmp_path, monkeypatch):
    """Points24: the training distribution (the paper's protocol), the grid tasks: held-out levels; a flag wins."""
    seen = []
    monkeypatch.setattr(E, "run_cli", lambda ns, *rest: seen.append((ns.task, ns.eval_split)))
    for argv in ("--task points24", "--task gridworld", "--task points24 --eval-split eval"):
        E.main(["run", "--agent", str(tmp_path), *argv.split()])
    assert seen == [("points24", "train"), ("gridworld", "eval"), ("points24", "eval")]


def test_bad_input_as_a_script_is_one_line_too():
    r = run_script("eval.py", "--agent", ROOT, "--task", "gridworld", "--seed", "-1e-5")
    assert (r.returncode, r.stderr) == (2, "eval.py: error: argument --seed: invalid int value: '-1e-5'\n")


# ----------------------------------------------------------------------------------------------------------
# Valid JSON and honest grouping in compare


def test_json_safe_replaces_nan_and_inf_at_any_depth():
    nan, inf = float("nan"), float("inf")
    row = {"a": [nan, 1.5, {"b": inf}], "c": (-inf, "x"), "d": None, "e": 3, "f": np.float64(nan)}
    safe = E.json_safe(row)
    assert safe == {"a": [None, 1.5, {"b": None}], "c": (None, "x"), "d": None, "e": 3, "f": None}
    assert json.loads(json.dumps(safe, allow_nan=False))["a"] == [None, 1.5, {"b": None}]
    assert math.isnan(row["a"][0])  # a copy: the caller's row keeps its NaN


def fake_run(path, metrics, ev=None, **settings):
    """A run directory as compare reads it: args.json, metrics.jsonl (lines as given), eval.json if `ev`."""
    path.mkdir()
    args = {"method": "ppo", "task": "gridworld", "seed": 1, "lr": 1e-5, "out": str(path), **settings}
    (path / "args.json").write_text(json.dumps(args))
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    if ev is not None:
        (path / "eval.json").write_text(ev)
    return str(path)


def test_compare_groups_by_every_setting_and_reads_null(tmp_path, capsys):
    step = '{{"env_steps": {}, "charts/success_rate": {}}}'.format
    agent = '{{"agent": {{"success": {}}}}}'.format  # eval.json as train.py writes it (null for NaN)
    # a, b, d: one setting (threads, out, eval_episodes do not split a group), seeds 1, 2, 3; d's success is
    # null: left out, not counted 0. a's curve holds a null and a bare NaN (not strict JSON): both dropped
    a = fake_run(tmp_path / "a", [step(8, 0.2), step(16, "null"), step(24, "NaN")], agent(0.2), threads=2,
                 eval_episodes=0)
    b = fake_run(tmp_path / "b", [step(8, 0.4), step(16, 0.6)], agent(0.5), seed=2)
    d = fake_run(tmp_path / "d", [step(8, 0.4)], agent("null"), seed=3)
    c = fake_run(tmp_path / "c", [step(8, 0.9)], lr=1e-4)   # differs in lr only: its own group; no eval.json
    png, md = tmp_path / "curves", tmp_path / "t.md"         # no .png: written exactly there
    E.main(["compare", a, b, d, c, "--out", str(png), "--table", str(md)])
    assert f"wrote {png} and {md}" in capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # success 0.2 and 0.5 -> mean 0.35, sample std |0.5-0.2|/sqrt(2) = 0.212; a run without eval.json: n/a
    assert md.read_text().splitlines()[2:] == [
        "| ppo (lr=1e-05) | 1,2,3 | n/a | 0.350 ± 0.212 | held-out | n/a | n/a | n/a | n/a | n/a |",
        "| ppo (lr=0.0001) | 1 | n/a | n/a | not evaluated | n/a | n/a | n/a | n/a | n/a |"]
    # the same run twice, or a copy of it, would count one seed twice: refused, naming both
    with pytest.raises(SystemExit) as stop:
        E.main(["compare", a, b, a])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"eval.py: error: {a} and {a} are the same setting with the same seed 1: " \
                                      "a seed may count only once in a group\n"
    # one run alone, as train.py draws its own curves: one row, labelled by its method
    table = E.compare([b], png=str(tmp_path / "one.png"))
    assert table.splitlines()[2:] == ["| ppo | 2 | n/a | 0.500 | held-out | n/a | n/a | n/a | n/a | n/a |"]
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_episode_metrics_by_hand():
    # 2 episodes, 4 turns: a turn whose thought states nothing checkable has nan grounding, left out of the mean
    eps = [{"success": 1.0, "return": 9.5, "length": 6}, {"success": 0.0, "return": -1.5, "length": 15}]
    turns = [{"thought": t, "format_ok": f, "action_valid": v, "grounding": g, "entropy": 0.25 * k, "tokens": 20 + k}
             for k, (t, f, v, g) in enumerate([("a b", 1.0, 1.0, 1.0), ("c", 1.0, 0.0, math.nan),
                                                ("a c", 1.0, 0.0, 0.5), ("", 0.0, 0.0, math.nan)])]
    row = E.episode_metrics(eps, turns)
    assert {k: row[k] for k in ("episodes", "success", "return", "length", "format_rate", "invalid_rate",
                                "grounding", "thought_entropy", "tokens")} == {
        "episodes": 2, "success": 0.5, "return": 4.0, "length": 10.5, "format_rate": 0.75, "invalid_rate": 0.75,
        "grounding": 0.75, "thought_entropy": 0.375, "tokens": 21.5}
    assert row["distinct2"] == 1.0  # bigrams "a b" and "a c": both distinct


def test_format_table_is_markdown_a_renderer_accepts():
    lines = E.format_table({"agent": {"success": 0.5}, "teacher": {}}).splitlines()
    assert lines[1] == "|---|" + "---|" * len(E.COLUMNS) and all(ln.count("|") == len(E.COLUMNS) + 2 for ln in lines)
    assert lines[2].startswith("| agent | 0.500 | n/a |")


def test_compare_table_reads_each_column_from_its_own_number(tmp_path):
    metrics = ['{"env_steps": 8, "charts/wall_time": 10}', '{"env_steps": 16, "charts/wall_time": 30}']
    agent = {"success": 0.5, "return": 4.25, "length": 7, "grounding": 0.875, "thought_entropy": 0.125}
    ev = json.dumps({"start (SFT)": {"success": 0.25}, "agent": agent, "teacher": {"success": 0.75}})
    table = E.compare([fake_run(tmp_path / "r", metrics, ev)], png=str(tmp_path / "c.png"))
    assert table.splitlines()[2] == "| ppo | 1 | 0.250 | 0.500 | held-out | 0.750 | 4.25 | 0.875 | 0.125 | 30 |"


def test_compare_names_a_damaged_run_and_reads_an_old_one_as_train_py_does(tmp_path):
    step = '{"env_steps": 8, "charts/success_rate": 0.5}'
    for name, metrics, ev in (("list-eval", [step], "[1]"), ("empty-list-eval", [step], "[]"),
                              ("int-row", [step, "5"], None)):
        with pytest.raises(ValueError, match=f"{name}: .* is damaged"):
            E.read_run(fake_run(tmp_path / name, metrics, ev))
    bad_args = fake_run(tmp_path / "list-args", [step])
    Path(bad_args, "args.json").write_text("[]")
    with pytest.raises(ValueError, match="args.json is damaged"):
        E.read_run(bad_args)
    # args.json from before --critic existed: the value head, as an explicit --critic head run of the same setting
    runs = [E.read_run(fake_run(tmp_path / "old", [step])), E.read_run(fake_run(tmp_path / "new", [step], seed=2,
                                                                                critic="head"))]
    assert list(E.group_runs(runs)) == ["ppo"]


def test_compare_labels_teacher_settings_only_for_turbo_methods(tmp_path):
    """Runs that differ in weighting: only turbo-kl's labels name it (ppo has no teacher to weight)."""
    step = '{"env_steps": 8, "charts/success_rate": 0.5}'
    runs = [E.read_run(fake_run(tmp_path / f"{m}-{w}", [step], method=m, weighting=w, format_reward=f))
            for m, w, f in (("ppo", "sma", "0,0"), ("turbo-kl", "ema", "3,-2"), ("turbo-kl", "sma", "3,-2"))]
    assert list(E.group_runs(runs)) == ["ppo (format_reward=0,0)", "turbo-kl (format_reward=3,-2, weighting=ema)",
                                        "turbo-kl (format_reward=3,-2, weighting=sma)"]
