"""Tests for env.py: rules worked out by hand, solvers against brute force, experts, parsing, lockstep."""
import hashlib
import importlib.util
import itertools
import json
import os
import pickle
import subprocess
import time
import warnings
import zlib

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import env as E

UP, DOWN, LEFT, RIGHT = range(4)


def load(level, **kw):
    """A SokobanEnv playing a hand-made XSB level ('#' wall, '.' target, '$' box, '*' box on a target, '@' player,
    '+' player on a target), from turn 0."""
    e = E.SokobanEnv(**kw)
    e.reset(seed=0)
    rows = level.split("\n")
    flat = "".join(rows)
    cells = lambda chars: {i for i, ch in enumerate(flat) if ch in chars}  # noqa: E731
    e._load(np.array([[ch == "#" for ch in r] for r in rows]), cells(".*+"), cells("$*"), cells("@+").pop())
    e.steps, e.level = 0, level
    return e


def brute_force_len(e, limit):
    """Shortest solution length by trying every move sequence up to `limit` (independent of the BFS)."""
    start = (e.player, e.boxes)
    for n in range(limit + 1):
        for seq in itertools.product(range(4), repeat=n):
            p, b = start
            for a in seq:
                p, b, _ = E.sokoban_move(e.nbr, p, b, a)
            if b == e.targets:
                return n
    return None


def act(e, name):
    return e.step(e.action_names.index(name))


# ------------------------------------------------------------------ Sokoban dynamics and rewards

def test_sokoban_push_off_and_onto_target_rewards():
    # Both boxes start on targets; push one off (-1), walk round it, push it back (+1 and +10).
    e = load("#######\n#  *  #\n#@*   #\n#     #\n#######")
    rewards = []
    for a in (RIGHT, DOWN, RIGHT, RIGHT, UP, LEFT):
        obs, r, term, trunc, info = e.step(a)
        rewards.append(r)
    assert rewards == pytest.approx([-1.1, -0.1, -0.1, -0.1, -0.1, 10.9])
    assert term and not trunc and info["success"] and info["steps"] == 6
    assert e.state_text() == "#######\n#  *  #\n# *@  #\n#     #\n#######"


def test_sokoban_push_into_wall_and_no_chain_push():
    e = load("#####\n#.@$#\n#####")
    _, r, term, trunc, _ = e.step(RIGHT)  # box against the wall: nothing moves, the step still costs
    assert r == pytest.approx(-0.1) and not term and e.state_text() == "#####\n#.@$#\n#####"
    e = load("#######\n#@$$..#\n#######")
    e.step(RIGHT)  # two boxes in a row: no chain push
    assert e.state_text() == "#######\n#@$$..#\n#######"
    assert E.solve_sokoban(e.nbr, e.targets, e.boxes, e.player) is None


def test_sokoban_truncation_and_skipped_turns():
    e = load("######\n#@$ .#\n######", max_steps=3)
    assert e.state_text() == "######\n#@$ .#\n######"
    _, r, term, trunc, _ = e.skip_turn()  # an invalid answer: no reward, no move, but a turn
    assert r == 0.0 and not (term or trunc) and e.steps == 1
    for t in range(2):
        _, r, term, trunc, _ = e.step(LEFT)  # into the wall
    assert r == pytest.approx(-0.1) and not term and trunc and e.steps == 3


@pytest.mark.parametrize("level,length", [
    ("#####\n#@$.#\n#####", 1),
    ("######\n#    #\n# $@ #\n# .  #\n######", 3),       # walk round the box to push it down
    ("#######\n#.$@$.#\n#######", 3),                    # two boxes: left, then right right
    ("#######\n#.    #\n#   $ #\n#    @#\n#######", 7),  # up 1 and left 3: two ways, both 7
])
def test_sokoban_solver_optimal_on_hand_levels(level, length):
    e = load(level)
    sol = e.solve()
    assert len(sol) == length == brute_force_len(e, length)
    total, term = 0.0, False
    for a in sol:
        _, r, term, _, _ = e.step(a)
        total += r
    assert term and total == pytest.approx(-0.1 * length + 10 + len(e.targets))


def test_sokoban_generator_determinism_solvability_and_range():
    e = E.SokobanEnv(min_solution_len=3, max_solution_len=6)
    levels = []
    for seed in range(60):
        obs, info = e.reset(seed=seed)
        obs2, info2 = e.reset(seed=seed)
        assert info["level"] == info2["level"] and np.array_equal(obs, obs2)
        sol = e.solve()
        assert 3 <= len(sol) <= 6
        levels.append(info["level"])
        if seed < 8:  # BFS optimality against brute force on generated levels
            assert brute_force_len(e, len(sol)) == len(sol)
    assert len(set(levels)) > 50 and obs.shape == (96, 96, 3) and obs.dtype == np.uint8
    big = E.SokobanEnv(dim_room=(7, 7), num_boxes=2, max_solution_len=10)
    _, info = big.reset(seed=1)
    assert big._obs().shape == (128, 128, 3) and info["level"].count("$") + info["level"].count("*") == 2
    with pytest.raises(RuntimeError, match="no SokobanEnv level for split=None in 3 tries"):
        E.SokobanEnv(max_solution_len=1, max_tries=3).reset(seed=0)  # none of 3 draws is solved in 1 move


# ------------------------------------------------------------------ GridWorld

def test_gridworld_wall_costs_a_step_and_goal_reward():
    e = E.GridWorldEnv()
    e.reset(seed=0)
    e.walls[1:-1, 1:-1] = False  # hand-made layout: open 4x4 room, player top-left, goal two right
    e._load(e.walls, e.w + 1, e.w + 3)
    _, r, term, trunc, info = e.step(UP)
    assert r == pytest.approx(-0.1) and e.player == e.w + 1 and info["steps"] == 1 and not term
    assert e.optimal_actions() == {RIGHT}
    e.step(RIGHT)
    _, r, term, trunc, info = e.step(RIGHT)
    assert r == pytest.approx(9.9) and term and info["success"]


def test_gridworld_expert_shows_the_first_optimal_move_in_action_order():
    ties = 0
    for seed in range(10):
        g = E.GridWorldEnv()
        g.reset(seed=seed)
        while g.optimal_actions():
            best = min(g.optimal_actions())
            assert json.loads(g.expert_answer())["action"] == E.MOVES[best]
            ties += len(g.optimal_actions()) > 1
            g.step(best)
    assert ties > 0  # states where more than one move is optimal were met


def test_gridworld_generator_solvable_and_deterministic():
    e = E.GridWorldEnv()
    for seed in range(100):
        _, info = e.reset(seed=seed)
        assert e.player in e.dist and e.player != e.goal
        assert e.reset(seed=seed)[1]["level"] == info["level"]


# ------------------------------------------------------------------ Points24 rules

def p24(cards):
    """A Points24Env dealt the given ranks (suits s h d c), from turn 0."""
    e = E.Points24Env()
    e.reset(seed=0)
    e._deal([(r, "shdc"[i]) for i, r in enumerate(cards)])
    return e


def play(e, tokens):
    out = None
    for t in tokens:
        out = act(e, t)
    return out


def test_points24_rules():
    e = p24([3, 8, 3, 8])
    _, r, term, _, _ = play(e, ["3", "+", "3", "+", "3"])  # a third 3
    assert r == -1.0 and term
    e = p24([3, 8, 3, 8])
    _, r, term, _, info = play(e, list("3+8+3+8") + ["="])  # 22
    assert r == -1.0 and term and not info["success"]
    e = p24([3, 8, 1, 1])
    _, r, term, _, _ = play(e, ["3", "*", "8", "="])  # 24 but two cards unused
    assert r == -1.0 and term
    e = p24([3, 8, 3, 8])
    _, r, term, _, info = play(e, list("8/(3-8/3)") + ["="])  # exactly 24 in Fractions
    assert r == 10.0 and term and info["success"]
    assert e.state_text() == "cards: 3 8 3 8 | formula: 8/(3-8/3)"
    e = p24([12, 1, 2, 13])  # Q A 2 K: values 10 1 2 10; "10" is its own token, "1" is the ace
    _, r, _, _, _ = play(e, ["10", "+", "10", "+", "2", "*", "1", "+"])
    assert r == 0.0 and e.formula == ["10", "+", "10", "+", "2", "*", "1", "+"]
    e = p24([12, 1, 2, 13])
    _, r, term, _, _ = play(e, ["1", "1"])
    assert r == -1.0 and term
    e = p24([1, 1, 8, 8])
    _, r, term, _, _ = play(e, ["8", "/", "(", "1", "-", "1", ")", "="])  # division by zero
    assert r == -1.0 and term
    e = p24([3, 8, 3, 8])
    _, r, term, _, _ = play(e, ["3", "8", "="])  # adjacent numbers: syntax error
    assert r == -1.0 and term
    e = p24([3, 8, 3, 8])
    for k in range(20):
        _, r, term, trunc, _ = act(e, "(")
        assert r == 0.0 and not (term or trunc)
    _, r, term, trunc, _ = act(e, "(")  # 21st token
    assert r == -1.0 and trunc and not term


def test_points24_solver():
    assert E.solve24((3, 3, 8, 8))[0] == (tuple("8/(3-8/3)"), "8/(3-8/3)")  # the shortest first
    assert E.evaluate_formula(E.tokenize_formula("8/(3-8/3)")) == 24
    sols = [s for _, s in E.solve24((1, 1, 4, 6))]
    assert "4*6*1*1" in sols and "(1+1)*4*6" not in sols
    for s in sols:
        toks = E.tokenize_formula(s)
        assert E.evaluate_formula(toks) == 24 and sorted(int(t) for t in toks if t.isdigit()) == [1, 1, 4, 6]
    assert E.solve24((1, 1, 1, 1)) == ()
    assert E.evaluate_formula(E.tokenize_formula("(1+2")) is None
    hands = list(itertools.combinations_with_replacement(range(1, 11), 4))[:120]
    # Solvability against an independent brute force: all orders, ops and the five tree shapes.
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b,
           lambda a, b: a / b if b else None]

    def brute(vals):
        from fractions import Fraction as F
        for a, b, c, d in itertools.permutations([F(v) for v in vals]):
            for f, g, h in itertools.product(ops, repeat=3):
                def ap(op, x, y):
                    return None if x is None or y is None else op(x, y)
                cands = [ap(h, ap(g, ap(f, a, b), c), d), ap(h, ap(f, a, ap(g, b, c)), d),
                         ap(h, ap(f, a, b), ap(g, c, d)), ap(f, a, ap(h, ap(g, b, c), d)),
                         ap(f, a, ap(g, b, ap(h, c, d)))]
                if 24 in cands:
                    return True
        return False
    for h in hands[:60]:
        assert bool(E.solve24(h)) == brute(h), h


# ------------------------------------------------------------------ split

@pytest.mark.parametrize("task", ["sokoban", "gridworld", "points24"])
def test_split_disjoint(task):
    train, ev = E.make_env(task, split="train"), E.make_env(task, split="eval")
    tr = {train.reset(seed=s)[1]["level"] for s in range(150)}
    evs = {ev.reset(seed=s)[1]["level"] for s in range(150)}
    assert not tr & evs and evs
    assert all(zlib.crc32(lv.encode()) % 10 == 0 for lv in evs) and all(zlib.crc32(lv.encode()) % 10 for lv in tr)
    with pytest.raises(ValueError):
        E.make_env(task, split="test")


# ------------------------------------------------------------------ gymnasium API

@pytest.mark.parametrize("task", ["sokoban", "gridworld", "points24"])
def test_check_env(task):
    e = E.make_env(task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(e, skip_render_check=True)  # no render modes: render_image is the replay picture
    obs, _ = e.reset(seed=0)
    assert obs.shape[0] % 32 == 0 and obs.shape[1] % 32 == 0 and obs.shape in ((96, 96, 3), (128, 192, 3))
    assert (e.render_image(scale=3)[::3, ::3] == obs).all()
    assert e.render_image(scale=3).shape == (obs.shape[0] * 3, obs.shape[1] * 3, 3)


# ------------------------------------------------------------------ parse_answer

def test_parse_answer():
    moves, cards = E.MOVES, E.P24_ACTIONS
    assert E.parse_answer('{"thoughts": "go", "action": "up"}', moves) == (0, True)
    assert E.parse_answer('  {"action": "LEFT", "thoughts": "x", "extra": 1}\n', moves) == (2, True)
    assert E.parse_answer('{"action": "up"}', moves) == (0, False)  # key missing
    assert E.parse_answer('{"thoughts": "a", "action": "up"} {"x": 1}', moves) == (0, False)  # two objects
    assert E.parse_answer('{"thoughts": "down", "action": "up', moves) == (0, False)  # broken JSON
    assert E.parse_answer('"action": "down" ... "action": right}', moves) == (3, False)  # the last one
    assert E.parse_answer('{"thoughts": "a", "action": "up or down"}', moves) == (None, True)
    assert E.parse_answer('{"thoughts": "a", "action": "move down"}', moves) == (1, True)
    assert E.parse_answer('{"thoughts": "a", "action": "jump"}', moves) == (None, True)
    keys = ("cards", "formula", "thoughts", "action")
    ans = '{"cards": ["K"], "formula": "", "thoughts": "t", "action": "10"}'
    assert E.parse_answer(ans, cards, keys) == (9, True)
    assert E.parse_answer(ans.replace('"10"', '"1"'), cards, keys) == (0, True)
    assert E.parse_answer(ans.replace('"10"', '"/"'), cards, keys) == (13, True)
    assert E.parse_answer(ans, cards) == (9, True)  # default keys: thoughts + action present
    assert E.parse_answer(ans, cards, ("x",)) == (9, False)
    rng = np.random.default_rng(0)
    garbage = [
        "", "   ", None, b"\xff\xfe".decode("latin-1"), rng.bytes(5000).decode("latin-1"),
        "x" * 1_000_000 + '"action": "up"', '{"a": ' * 10_000 + "1" + "}" * 10_000,
        "[" * 10_000 + "]" * 10_000, '"action":' * 1000, '{"thoughts": "\\ud800", "action": "\\"',
    ]
    t = time.perf_counter()
    results = [E.parse_answer(g, moves) for g in garbage]
    assert time.perf_counter() - t < 1.0
    assert [r[1] for r in results] == [False] * len(garbage)
    assert results[5] == (0, False) and all(r[0] is None for i, r in enumerate(results) if i != 5)
    assert E.extract_thought('{"thoughts": "a \\"b\\"", "action": "up"}') == 'a "b"'
    assert E.extract_thought("garbage") is None


# ------------------------------------------------------------------ experts and grounding

@pytest.mark.parametrize("task,kw", [("sokoban", {}), ("gridworld", {}), ("points24", {"solvable_only": True})])
def test_expert_solves_every_env(task, kw):
    e = E.make_env(task, **kw)
    max_words = 0
    for seed in range(200):
        e.reset(seed=seed)
        done, info = False, {}
        while not done:
            text = e.expert_answer()
            action, fmt = E.parse_answer(text, e.action_names, e.answer_keys)
            assert fmt and list(json.loads(text)) == list(e.answer_keys)
            assert action in e.optimal_actions()
            thought = json.loads(text)["thoughts"]
            max_words = max(max_words, len(thought.split()))
            assert e.grounding(thought) == 1.0
            _, _, term, trunc, info = e.step(action)
            done = term or trunc
        assert info["success"], (task, seed)
    assert max_words <= 40


def test_expert_phrasing_and_wrong_facts():
    e = load("######\n#    #\n# $@ #\n# .  #\n######")
    thought = json.loads(e.expert_answer())["thoughts"]
    assert thought == "player 2,3 box 2,2 target 3,2 push down from above so up."
    assert e.grounding(thought.replace("box 2,2", "box 1,2")) == pytest.approx(2 / 3)
    assert e.grounding("I will move up") is None and e.grounding(None) is None
    assert e.grounding("player 99,2") == 0.0
    assert e.grounding("player 1,9") == 0.0  # off the 6-wide board, not cell 1*6+9 = 15, which is 2,3
    p = p24([3, 8, 3, 8])
    play(p, list("8/(3"))
    ans = json.loads(p.expert_answer())
    assert ans == {"cards": ["3", "8", "3", "8"], "formula": "8/(3",
                   "thoughts": "cards 3 8 3 8. target 8/(3-8/3). next -.", "action": "-"}
    assert p.grounding("cards 3 8 8 8. formula 8/(3. target 8/(3-8/3). next -.") == pytest.approx(2 / 3)
    assert p.grounding("cards 3 8 3 8. formula 8/(3. target 8/(3+8/3). next +.") == pytest.approx(2 / 3)
    assert p.grounding("cards 3 8 3 8. formula 8/3. target 8/3*3*8. next -.") == pytest.approx(1 / 3)
    r = p24([3, 8, 3, 8])  # no card played yet: the prompt's "(empty)" and a bare "empty" are both true
    assert "Formula: (empty)." in r.prompt()
    assert r.grounding("formula (empty).") == r.grounding("formula empty.") == 1.0
    assert r.grounding("formula 8.") == 0.0 and p.grounding("formula (empty).") == 0.0  # p's formula is 8/(3
    q = p24([1, 1, 1, 1])  # unsolvable: the expert ends the episode at once
    assert json.loads(q.expert_answer())["action"] == "=" and q.optimal_actions() == {16}
    g = E.GridWorldEnv()
    g.reset(seed=4)
    th = json.loads(g.expert_answer())["thoughts"]
    assert g.grounding(th) == 1.0 and g.grounding(th.replace("goal ", "goal 0,0 x ")) < 1.0
    assert g.grounding(th + " box 1,1") == 1.0  # GridWorld has no boxes: a box is no fact of it, true or false


# ------------------------------------------------------------------ LockstepEnvs

def test_lockstep_autoreset_and_invalid_turns():
    envs = E.LockstepEnvs("gridworld", 3, seed=7, invalid_penalty=-1.0, max_steps=4)
    images, prompts = envs.observe()
    assert len(images) == 3 and images[0].shape == (96, 96, 3) and prompts[0].startswith("GridWorld:")
    before = [e.player for e in envs.envs]
    out = envs.step_texts(["garbage", '{"thoughts": "x", "action": "up down"}', envs.envs[2].expert_answer()])
    assert [e.player for e in envs.envs][:2] == before[:2] and [e.steps for e in envs.envs] == [1, 1, 1]
    assert out["reward"][:2].tolist() == [-1.0, -1.0] and out["action"].tolist()[:2] == [-1, -1]
    assert out["action_valid"].tolist() == [False, False, True]
    assert out["format_ok"].tolist() == [False, True, True]
    assert np.isnan(out["grounding"][0]) and out["grounding"][2] == 1.0
    for _ in range(3):  # three more invalid turns: max_steps 4 truncates envs 0 and 1, then auto-reset
        out = envs.step_texts(["", "", envs.envs[2].expert_answer()])
    assert out["truncated"][0] and out["done"][0] and not out["terminated"][0]
    eps = {ep["env"]: ep for ep in out["episodes"]}
    assert eps[0]["length"] == 4 and eps[0]["return"] == 0.0 and eps[0]["invalid"] == 4
    assert envs.envs[0].steps == 0 and envs.next_episode >= 5
    # Random-action mode: the env moves, the answer still counts as invalid.
    envs = E.LockstepEnvs("sokoban", 4, seed=1, invalid="random")
    out = envs.step_texts([""] * 4)
    assert out["action_valid"].sum() == 0 and (out["action"] == -1).all()
    assert [e.steps for e in envs.envs] == [1] * 4


def test_an_episode_succeeds_when_its_level_is_solved_not_when_a_box_scores():
    # two boxes, one turn allowed: pushing one box onto a target pays +1 (reward 0.9) as the time limit ends the
    # episode, unsolved; the one-box level solved on the same turn is a success
    for level, reward, success in (("#######\n#@$.$.#\n#######", 0.9, False), ("#####\n#@$.#\n#####", 10.9, True)):
        envs = E.LockstepEnvs("sokoban", 1, seed=0)
        envs.envs[0] = load(level, max_steps=1)
        out = envs.step_texts(['{"thoughts": "x", "action": "right"}'])
        assert out["done"][0] and out["reward"][0] == pytest.approx(reward)
        assert [ep["success"] for ep in out["episodes"]] == [success]


def test_lockstep_episode_k_is_seeded_with_seed_times_1000003_plus_k():
    # seed 5: env 1's first level is that of seed 5 * 1,000,003 + 1; seed 6's env 0 meets another
    envs = E.LockstepEnvs("sokoban", 2, seed=5)
    level = E.make_env("sokoban", split="train").reset(seed=5_000_016)[1]["level"]
    assert envs.envs[1].level == level and E.LockstepEnvs("sokoban", 2, seed=6).envs[0].level != level


def test_lockstep_state_dict_roundtrip_continues_identically():
    def run(envs, n, rng):
        outs = []
        for _ in range(n):
            opt = envs.expert_texts()
            texts = [t if rng.random() < 0.7 else "nonsense" for t in opt]
            out = envs.step_texts(texts)
            outs.append((out["reward"].tolist(), out["done"].tolist(), [ep["level"] for ep in out["episodes"]],
                         [im.tobytes() for im in envs.observe()[0]]))
        return outs

    for task in ("sokoban", "points24"):
        a = E.LockstepEnvs(task, 4, seed=3, invalid="random")
        run(a, 6, np.random.default_rng(0))
        state = pickle.loads(pickle.dumps(a.state_dict()))
        ref = run(a, 20, np.random.default_rng(1))
        b = E.LockstepEnvs(task, 4, seed=99, invalid="random")
        b.load_state_dict(state)
        assert run(b, 20, np.random.default_rng(1)) == ref
        assert sum(len(o[2]) for o in ref) > 0  # episodes did finish (and auto-reset) in the compared part


def test_noisy_demonstrator_keeps_the_facts_and_randomises_only_the_move():
    envs = E.LockstepEnvs("sokoban", 64, seed=5)
    clean = envs.expert_texts()
    noisy = envs.expert_texts(noise=1.0)
    changed = 0
    for c, n, env in zip(clean, noisy, envs.envs):
        c, n = json.loads(c), json.loads(n)
        head = c["thoughts"].rsplit("so ", 1)[0]
        assert n["thoughts"] == f"{head}so {n['action']}." and n["action"] in env.action_names
        assert env.grounding(n["thoughts"]) == 1.0  # every stated position is still true
        changed += n["action"] != c["action"]
    # a uniform draw over 4 moves keeps the expert's move 1/4 of the time: 48 of 64 changed on average
    assert 36 <= changed <= 58
    # noise 0 is the expert itself, and the noise stream is part of the resumable state
    assert envs.expert_texts(noise=0.0) == clean
    state = envs.state_dict()
    first = envs.expert_texts(noise=0.5)
    envs.load_state_dict(state)
    assert envs.expert_texts(noise=0.5) == first


def garbage_answers(rng, experts, n):
    """Answers no parser may accept: damaged experts whose action value names no move, huge numbers, deep
    nesting, random unicode and punctuation."""
    big = "9" * int(rng.choice([7, 500, 5000]))
    kinds = [
        lambda e: e.replace("row ", "row " + big, 1).rsplit('"action"', 1)[0],  # 5,000-digit coordinate, no action
        lambda e: e.rsplit('"action": "', 1)[0] + '"action": "' + big + '"}',    # the action is a number
        lambda e: e.replace('"action"', '"act"'),                                 # no action key
        lambda e: "[" * int(rng.integers(1, 50_000)),
        lambda e: "".join(chr(int(c)) for c in rng.integers(0x20, 0x3000, int(rng.integers(0, 200)))),
        lambda e: '{"thoughts": "cards ' + big + ' formula (' + big + ')/0 target ' + "(" * 3000 + '", "action": "?"}',
        lambda e: e.rsplit('"action"', 1)[0] + '"action": "up down left right"}',  # names several moves
    ]
    return [kinds[int(rng.integers(len(kinds)))](str(rng.choice(experts))) for _ in range(n)]


@pytest.mark.parametrize("task", ["sokoban", "gridworld", "points24"])
def test_garbage_answers_never_raise_and_leave_every_state_unchanged(task):
    envs = E.LockstepEnvs(task, 8, seed=5)
    rng = np.random.default_rng(0)
    turns = invalid = 0
    for _ in range(375):  # 3,000 answers
        keys = [e.state_text() for e in envs.envs]
        out = envs.step_texts(garbage_answers(rng, envs.expert_texts(), 8))
        after = [e.state_text() for e in envs.envs]
        turns += 8
        invalid += int((~out["action_valid"]).sum())
        assert (out["action"] == -1).all() and not out["terminated"].any()
        # an env that was not reset (episode cut at its turn limit) is exactly where it was
        assert all(a == k for a, k, done in zip(after, keys, out["done"]) if not done)
        assert (out["reward"] == -1.0).all()  # Points24 and Sokoban give 0 for a wall bump; the penalty is -1
        assert all(ep["invalid"] == ep["length"] for ep in out["episodes"])
    assert invalid == turns == 3000


# ------------------------------------------------------------------ parity with the reference implementation

REFERENCE_COMMIT = "2c156afcd11eda5fc713a16837bccfafe9442ea6"  # env.py whose behaviour this one must keep exactly


@pytest.fixture(scope="module")
def reference_env(tmp_path_factory):
    """The reference env.py from git history, imported as its own module (skipped without the history)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        src = subprocess.run(["git", "show", f"{REFERENCE_COMMIT}:env.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history with the reference env.py is not available")
    path = tmp_path_factory.mktemp("reference") / "reference_env.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("reference_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("SokobanEnv", "GridWorldEnv", "Points24Env"):  # FORMAT_VERSION 3 shortened the prompts, nothing else
        getattr(module, name).prompt = getattr(E, name).prompt
    return module


def digest(image):
    return hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)


def same_keys(info):
    """The info keys this env.py shares with the reference (which also counted boxes on targets)."""
    return {k: info[k] for k in ("level", "steps", "success")}


def state_of(env):
    """The state as text (the reference names the method _text)."""
    return env.state_text() if hasattr(env, "state_text") else env._text()


def play_trace(M, task, seeds, **kw):
    """Everything an env shows over one episode per seed (half expert, half random moves, some skipped turns):
    image digests, infos, rewards, prompts, expert and noisy answers, optimal actions, grounding scores."""
    env, rng, noise = M.make_env(task, **kw), np.random.default_rng(0), np.random.default_rng(1)
    rows = []
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        rows.append((digest(obs), same_keys(info)))
        done = False
        while not done:
            expert = env.expert_answer()
            thought = json.loads(expert)["thoughts"]
            rows.append((env.prompt(), expert, M.noisy_answer(expert, env.action_names, noise), state_of(env),
                         sorted(env.optimal_actions()), env.grounding(thought),
                         env.grounding(thought.replace("1", "2")), env.grounding(thought[: len(thought) // 2])))
            r = rng.random()
            if r < 0.1:
                obs, reward, term, trunc, info = env.skip_turn()
            else:
                a = M.parse_answer(expert, env.action_names, env.answer_keys)[0] if r < 0.55 else \
                    int(rng.integers(env.action_space.n))
                obs, reward, term, trunc, info = env.step(a)
            rows.append((digest(obs), reward, term, trunc, same_keys(info)))
            done = term or trunc
    return rows


def lockstep_trace(M, task, turns, **kw):
    """step_texts outcomes of 8 envs over `turns` turns of expert, noisy, damaged and garbage answers."""
    envs, rng = M.LockstepEnvs(task, 8, seed=3, invalid="random", invalid_penalty=-0.5, **kw), np.random.default_rng(2)
    rows = []
    for t in range(turns):
        texts = [e if r < 0.5 else e.replace('"action"', '"act"') if r < 0.6 else e[: len(e) // 2] if r < 0.8
                 else "garbage" for e, r in zip(envs.expert_texts(noise=0.3), rng.random(8))]
        out = envs.step_texts(texts)
        images, prompts = envs.observe()
        rows.append((json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}),
                     [digest(im) for im in images], prompts, [state_of(e) for e in envs.envs]))
    return rows


@pytest.mark.parametrize("task,seeds,kw", [("sokoban", 300, {}), ("gridworld", 300, {}), ("points24", 200, {}),
                                           ("points24", 100, {"solvable_only": True, "split": "eval"}),
                                           ("sokoban", 30, {"dim_room": (7, 7), "num_boxes": 2, "split": "train"})])
def test_same_behaviour_as_the_reference(reference_env, task, seeds, kw):
    # levels and their RNG draws, images pixel for pixel, prompts and answers byte for byte, rewards, optimal
    # actions, grounding, the split, parsing, and the lockstep helper's outcomes
    assert play_trace(E, task, range(seeds), **kw) == play_trace(reference_env, task, range(seeds), **kw)
    assert lockstep_trace(E, task, 60, **kw) == lockstep_trace(reference_env, task, 60, **kw)
