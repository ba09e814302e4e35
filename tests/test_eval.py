"""eval.py: diversity metrics by hand, the solver/random reference agents on held-out levels, and the CLI
(`compare` on two tiny runs, `--gif` replays, bad input) run as a script."""
import json
import math
import os
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as E  # noqa: E402

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
    assert math.isnan(E.self_bleu2(["only one"]))


def test_extract_thought_from_good_and_broken_answers():
    assert E.extract_thought('{"thoughts": "box at \\"row 1\\"", "action": "up"}') == 'box at "row 1"'
    assert E.extract_thought('player left "action": "up"') == "player left "
    assert E.extract_thought(None) == ""


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


def test_eval_split_train_deals_only_training_levels():
    """--eval-split train (the paper's Points24 protocol) plays levels from the training side of the crc32 split;
    the default plays only held-out ones; anything else is refused."""
    from env import in_eval_split
    levels = {}
    for split in ("eval", "train"):
        eps, _ = E.play(E.ExpertActor(), "points24", 24, seed=0, num_envs=8, split=split)
        levels[split] = [e["level"] for e in eps]
        assert len(eps) == 24
    assert all(in_eval_split(x) for x in levels["eval"]) and not any(in_eval_split(x) for x in levels["train"])
    with pytest.raises(ValueError, match="split"):
        E.play(E.ExpertActor(), "points24", 4, seed=0, split="test")


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


def test_expert_replay_gif_has_one_frame_per_turn_plus_the_final_state(tmp_path):
    replays = E.write_replays(E.ExpertActor(), "gridworld", 2, seed=3, out_dir=str(tmp_path))
    for k, r in enumerate(replays):
        # the expert walks a shortest path: the episode's turns are the BFS distance of its level
        assert r["success"] and r["length"] == bfs_length(r["level"])
        gif = Image.open(tmp_path / f"replay_{k}.gif")
        assert gif.n_frames == r["length"] + 1 == r["frames"]
        assert gif.size[0] >= 96 * E.GIF_SCALE  # the 96x96 GridWorld image scaled 4x, caption below


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
                       cwd=base)  # the SFT warm-up cache (runs/sft-cache) goes to the temp dir too
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
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in body}
    for method in ("ppo", "turbo-kl"):
        ev = json.loads((runs[method] / "eval.json").read_text())
        assert cells[method][1] == f"{ev['start (SFT)']['success']:.3f}" and cells[method][2] == f"{ev['agent']['success']:.3f}"
    assert cells["ppo"][4] == "n/a" and cells["turbo-kl"][4] == f"{json.loads((runs['turbo-kl'] / 'eval.json').read_text())['teacher']['success']:.3f}"
    assert table.strip() in r.stdout
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.reshape(-1, 3).std(0).max() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # not blank
    # ablation labels: a non-default flag of a teacher method shows; ppo never gets one
    assert E.run_label({"method": "turbo-kl", "merge": "linear", "weighting": "sma", "teacher": "merged"}) == \
        "turbo-kl (merge=linear)"
    assert E.run_label({"method": "turbo-kl", "teacher": "static"}) == "turbo-kl (teacher=static)"
    assert E.run_label({"method": "gtr", "merge": "linear", "teacher": "merged"}) == "gtr"


def test_eval_run_writes_full_json_and_gif_with_one_frame_per_turn(runs):
    run = runs["turbo-kl"]
    r = run_script("eval.py", run, "--episodes", "2", "--num-envs", "2", "--gif", "1")
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


def test_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "args.json").write_text("{}")
    for argv in ([tmp_path / "missing"], [tmp_path / "norun"], ["compare", tmp_path / "missing"],
                 ["--agent", tmp_path / "norun", "--task", "gridworld"]):
        r = run_script("eval.py", *argv)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eval.py: error:"), (argv, r.stderr)
