"""env.py: the three tasks of gtr-turbo as gymnasium environments, with solvers, expert answers,
answer parsing and a lockstep batch helper.

What is here (GTR_TURBO.md section 1, "the setting", and section 6, "how this project scales it down"):
- `SokobanEnv` (`gtr/Sokoban-v0`), `GridWorldEnv` (`gtr/GridWorld-v0`), `Points24Env` (`gtr/Points24-v0`).
  The observation is the RGB image; the agent answers with one JSON object per turn (a thought and an
  action), parsed by `parse_answer` with the paper's rule (text after the last `"action":`).
- Privileged knowledge for SFT demos, the GTR corrector and the thought-grounding metric:
  `expert_answer()` (a JSON answer whose thought states checkable facts, and an optimal action),
  `optimal_actions()`, `grounding(thought)`.
- Solvers: BFS for Sokoban (moves are the cost, as in the step count) and GridWorld; exhaustive exact
  search (`fractions.Fraction`) for Points24.
- `LockstepEnvs`: N envs stepped together from N answer texts, with auto-reset, invalid-answer handling
  (a penalised no-op turn, or the reference code's random legal action) and a resumable state.

Deliberately left out: gym-sokoban's reverse-play level generator (random placement plus BFS is exact
and fast at these sizes), ALFWorld (a text world far too heavy for a laptop), any rendering beyond
what a 16-px-patch vision tower needs to read the state.

Coordinates in thoughts are "r,c" (row, column), 0-based, counting the border walls (row 0 is the top
wall), so they match the cells of the image one to one. Turns are compact (a Sokoban prompt is 41 tokens
with the image, an answer about 27): every turn's tokens are paid for by sampling, scoring and PPO.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import zlib
from collections import deque
from fractions import Fraction
from functools import lru_cache

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# ---------------------------------------------------------------------------------------------------
# Shared pieces: train/eval split, answer parsing, drawing of grid cells
# ---------------------------------------------------------------------------------------------------

MOVES = ["up", "down", "left", "right"]
MOVE_DELTAS = [(-1, 0), (1, 0), (0, -1), (0, 1)]
SPLITS = (None, "train", "eval")
CELL = 16  # px per grid cell: one cell per 16 px vision patch of Qwen2.5-VL

FORMAT_VERSION = 2  # of prompts and expert answers; a cached SFT agent of another version is not reused
# Answers longer than this are never a well-formed answer of a 256-token generation; the JSON check is
# skipped for them so that a megabyte of garbage costs no more than a linear scan.
MAX_JSON_CHARS = 20_000
MAX_ACTION_VALUE_CHARS = 200


def in_eval_split(canonical: str) -> bool:
    """A level belongs to the held-out evaluation set iff crc32 of its canonical text is 0 mod 10."""
    return zlib.crc32(canonical.encode()) % 10 == 0


def split_accepts(canonical: str, split: str | None) -> bool:
    """Whether a level of this canonical text may be dealt under `split` (None keeps all)."""
    if split is None:
        return True
    return in_eval_split(canonical) == (split == "eval")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


_ACTION_KEY = re.compile(r'"action"\s*:')
_VALUE_TOKEN = re.compile(r"[a-z]+|\d+|[-+*/()=]")


def parse_answer(text, action_names, keys=("thoughts", "action")):
    """Parse one model answer -> (action index or None, format_ok).

    format_ok: the text is exactly one JSON object (whitespace around it allowed) holding every key in
    `keys` (extra keys allowed). The action is read from the text after the last `"action":`, so it
    works on broken JSON too: its value (the quoted string, or the raw text up to `,` `}` or a newline)
    must name exactly one distinct legal action, compared case-insensitively as whole tokens (so "10"
    never counts as "1"). Never raises: garbage, huge or deeply nested input gives (None, False).
    """
    if not isinstance(text, str):
        return None, False
    format_ok = False
    if len(text) <= MAX_JSON_CHARS:
        try:
            obj = json.loads(text)
            format_ok = isinstance(obj, dict) and all(k in obj for k in keys)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
            format_ok = False
    last = None
    for last in _ACTION_KEY.finditer(text):
        pass
    if last is None:
        return None, format_ok
    rest = text[last.end(): last.end() + MAX_ACTION_VALUE_CHARS].lstrip()
    if rest.startswith('"'):
        end = rest.find('"', 1)
        value = rest[1:] if end < 0 else rest[1:end]
    else:
        value = re.split(r"[,}\n]", rest, maxsplit=1)[0]
    value = value.strip().lower()
    lowered = [a.lower() for a in action_names]
    if value in lowered:
        return lowered.index(value), format_ok
    found = {t for t in _VALUE_TOKEN.findall(value) if t in lowered}
    if len(found) == 1:
        return lowered.index(found.pop()), format_ok
    return None, format_ok


_FINAL_MOVE = re.compile(r"so [a-z0-9]+\.$")


def noisy_answer(answer: str, action_names, rng) -> str:
    """The expert's answer with its decision replaced by a uniformly random legal move: the thought's
    facts (positions, plan) stay true, only its last clause `so X.` and the action change. SFT on
    such answers aims at a start that reads the board reliably and chooses its move noisily, so that the
    randomness of a sampled answer sits in its decision tokens rather than its perception tokens (README,
    "Acid test", measures that RL then lifts it). Answers without that clause (Points24) keep their thought
    and change the action."""
    obj = json.loads(answer)
    move = action_names[int(rng.integers(len(action_names)))]
    obj["thoughts"] = _FINAL_MOVE.sub(f"so {move}.", obj["thoughts"])
    obj["action"] = move
    return answer_json(obj)


_THOUGHT_VALUE = re.compile(r'"thoughts"\s*:\s*"((?:[^"\\]|\\.)*)"')


def extract_thought(text) -> str | None:
    """The value of the "thoughts" key of an answer (also from broken JSON), or None."""
    if not isinstance(text, str):
        return None
    m = _THOUGHT_VALUE.search(text[:MAX_JSON_CHARS])
    if m is None:
        return None
    try:
        return json.loads('"' + m.group(1) + '"')
    except ValueError:
        return m.group(1)


def _pad32(n: int) -> int:
    """Round a side up to a multiple of 32 px (Qwen2.5-VL: patch 16 x spatial merge 2)."""
    return -(-n // 32) * 32


# Cell kinds of the grid image. Targets/goals colour the whole cell and the player is an inner square,
# so a target under the player stays visible.
FLOOR, WALL, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET, GOAL, PLAYER_ON_GOAL = range(9)
_COLORS = {
    "floor": (235, 235, 235), "wall": (110, 110, 110), "target": (230, 70, 70), "box": (160, 100, 40),
    "box_on_target": (60, 170, 60), "player": (40, 80, 220), "goal": (60, 190, 90),
}


def _make_tiles() -> np.ndarray:
    """[9, CELL, CELL, 3] uint8: one tile per cell kind."""
    t = np.zeros((9, CELL, CELL, 3), np.uint8)
    c = _COLORS
    t[FLOOR] = c["floor"]
    t[WALL] = c["wall"]
    t[WALL, ::4, :] = (90, 90, 90)  # faint brick lines: walls differ from floor by texture too
    t[TARGET] = c["target"]
    t[BOX] = c["floor"]
    t[BOX, 1:-1, 1:-1] = c["box"]
    t[BOX_ON_TARGET] = c["target"]
    t[BOX_ON_TARGET, 2:-2, 2:-2] = c["box_on_target"]
    for kind, under in ((PLAYER, "floor"), (PLAYER_ON_TARGET, "target"), (PLAYER_ON_GOAL, "goal")):
        t[kind] = c[under]
        t[kind, 4:-4, 4:-4] = c["player"]
    t[GOAL] = c["goal"]
    return t


_TILES = _make_tiles()


def draw_grid(kinds: np.ndarray) -> np.ndarray:
    """[h, w] cell kinds -> [H, W, 3] uint8 image, sides padded (black) to multiples of 32 px."""
    h, w = kinds.shape
    img = _TILES[kinds].transpose(0, 2, 1, 3, 4).reshape(h * CELL, w * CELL, 3)
    out = np.zeros((_pad32(h * CELL), _pad32(w * CELL), 3), np.uint8)
    out[: h * CELL, : w * CELL] = img
    return out


def _neighbours(passable: np.ndarray):
    """nbr[p][a]: flat index of the cell one move `a` from flat cell p, or -1 (wall or off the grid)."""
    h, w = passable.shape
    nbr = []
    for r in range(h):
        for c in range(w):
            row = []
            for dr, dc in MOVE_DELTAS:
                rr, cc = r + dr, c + dc
                ok = 0 <= rr < h and 0 <= cc < w and passable[rr, cc]
                row.append(rr * w + cc if ok else -1)
            nbr.append(tuple(row))
    return nbr


_POSITION_FACT = re.compile(r"\b(player|box|target|goal) (\d+),(\d+)")


def position_facts(thought: str) -> list[tuple[str, int, int]]:
    """(kind, row, col) of every "<kind> R,C" in a thought. A coordinate of more than 6 digits
    (off any board) reads as 10**6, so a 5,000-digit number is a false fact, not an int() overflow."""
    num = lambda s: int(s) if len(s) <= 6 else 10 ** 6  # noqa: E731
    return [(k, num(r), num(c)) for k, r, c in _POSITION_FACT.findall(thought[:MAX_JSON_CHARS])]


def _pos(p: int, w: int) -> str:
    return f"{p // w},{p % w}"


def answer_json(obj: dict) -> str:
    """An answer as compact JSON (no spaces after separators): the paper's keys, fewer tokens."""
    return json.dumps(obj, separators=(",", ":"))


class _TurnEnv(gym.Env):
    """Common turn bookkeeping: step counter, skip_turn, render modes, render_image."""

    metadata = {"render_modes": ["rgb_array", "ansi"], "render_fps": 4}
    answer_keys = ("thoughts", "action")
    action_names: list = []

    def __init__(self, render_mode, max_steps, split):
        if render_mode not in (None, "rgb_array", "ansi"):
            raise ValueError(f"render_mode must be None, 'rgb_array' or 'ansi', got {render_mode!r}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        _check_split(split)
        self.render_mode = render_mode
        self.max_steps = int(max_steps)
        self.split = split
        self.action_space = spaces.Discrete(len(self.action_names))
        self.steps = 0
        self.level = ""

    def _set_obs_space(self, shape):
        if getattr(self, "observation_space", None) is None or self.observation_space.shape != shape:
            self.observation_space = spaces.Box(0, 255, shape, np.uint8)

    def _info(self, success=False):
        return {"level": self.level, "steps": self.steps, "success": bool(success)}

    def skip_turn(self):
        """Spend a turn without changing the state (an invalid answer): counts toward max_steps."""
        self.steps += 1
        return self._obs(), 0.0, False, self.steps >= self.max_steps, self._info()

    def render(self):
        """rgb_array (also for render_mode=None): the observation image; ansi: the state as text."""
        return self._text() if self.render_mode == "ansi" else self._obs()

    def render_image(self, scale: int = 4) -> np.ndarray:
        """The observation enlarged `scale` times (nearest neighbour) for human viewing, e.g. GIFs."""
        if int(scale) < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        return self._obs().repeat(int(scale), axis=0).repeat(int(scale), axis=1)


# ---------------------------------------------------------------------------------------------------
# Sokoban
# ---------------------------------------------------------------------------------------------------


class SokobanSolverLimit(RuntimeError):
    """The Sokoban BFS explored more than its node limit without proving a solution length."""


_XSB_CHARS = set("# .$@*+")


def parse_xsb(text: str):
    """XSB level text -> (walls [h, w] bool, targets set, boxes set, player), cells as flat indices.

    Lines must be of equal length (a rectangular level); exactly one player; as many boxes as targets.
    """
    if not isinstance(text, str):
        raise ValueError("level must be an XSB string")
    rows = text.strip("\n").split("\n")
    w = len(rows[0]) if rows else 0
    if w == 0 or any(len(r) != w for r in rows):
        raise ValueError(f"XSB level must be rectangular (all lines of one length), got line lengths "
                         f"{[len(r) for r in rows]}")
    bad = set("".join(rows)) - _XSB_CHARS
    if bad:
        raise ValueError(f"unknown XSB characters {sorted(bad)}; allowed: '# .$@*+'")
    walls = np.array([[ch == "#" for ch in r] for r in rows], bool)
    flat = "".join(rows)
    targets = {i for i, ch in enumerate(flat) if ch in ".*+"}
    boxes = {i for i, ch in enumerate(flat) if ch in "$*"}
    players = [i for i, ch in enumerate(flat) if ch in "@+"]
    if len(players) != 1:
        raise ValueError(f"XSB level needs exactly one player (@ or +), found {len(players)}")
    if not boxes or len(boxes) != len(targets):
        raise ValueError(f"XSB level needs as many boxes as targets (>= 1); boxes {len(boxes)}, "
                         f"targets {len(targets)}")
    return walls, targets, boxes, players[0]


def to_xsb(walls: np.ndarray, targets, boxes, player: int) -> str:
    """The inverse of parse_xsb: rows joined by newlines."""
    h, w = walls.shape
    chars = []
    for p in range(h * w):
        if walls.flat[p]:
            ch = "#"
        elif p == player:
            ch = "+" if p in targets else "@"
        elif p in boxes:
            ch = "*" if p in targets else "$"
        else:
            ch = "." if p in targets else " "
        chars.append(ch)
    return "\n".join("".join(chars[r * w:(r + 1) * w]) for r in range(h))


def live_cells(nbr, targets) -> set:
    """Cells from which a lone box can still be pushed onto some target (others are dead squares).

    Found backwards: a box at `prev` can be pushed one step in direction a onto a live cell if `prev`
    and the player's cell behind it are free. Boxes are never pushed onto dead squares by the solver.
    """
    opposite = (1, 0, 3, 2)
    live, todo = set(targets), deque(targets)
    while todo:
        q = todo.popleft()
        for a in range(4):
            prev = nbr[q][opposite[a]]  # box came from prev, pushed in direction a
            if prev < 0 or prev in live:
                continue
            if nbr[prev][opposite[a]] >= 0:  # the player stood behind prev
                live.add(prev)
                todo.append(prev)
    return live


def sokoban_move(nbr, player: int, boxes: frozenset, a: int):
    """One Sokoban move -> (player, boxes, pushed: (from, to) or None). Blocked moves change nothing.

    A box is pushed when the cell behind it is free (floor or target); no chain pushes, no pulls.
    """
    q = nbr[player][a]
    if q < 0:
        return player, boxes, None
    if q in boxes:
        r = nbr[q][a]
        if r < 0 or r in boxes:
            return player, boxes, None
        return q, (boxes - {q}) | {r}, (q, r)
    return q, boxes, None


def solve_sokoban(nbr, targets, boxes, player, max_nodes=200_000, max_depth=None, live=None):
    """BFS over (player, boxes): the shortest list of move indices that puts every box on a target.

    Returns None if no solution exists (within `max_depth` moves when given). Raises
    SokobanSolverLimit when more than `max_nodes` states are visited before an answer is known.
    """
    targets = frozenset(targets)
    live = live_cells(nbr, targets) if live is None else live
    start = (player, frozenset(boxes))
    if start[1] == targets:
        return []
    parent = {start: None}
    frontier, depth = [start], 0
    while frontier and (max_depth is None or depth < max_depth):
        depth += 1
        nxt = []
        for state in frontier:
            p, bx = state
            for a in range(4):
                p2, bx2, pushed = sokoban_move(nbr, p, bx, a)
                if p2 == p or (pushed is not None and pushed[1] not in live):
                    continue
                s2 = (p2, bx2)
                if s2 in parent:
                    continue
                parent[s2] = (state, a)
                if bx2 == targets:
                    path = []
                    while parent[s2] is not None:
                        s2, a2 = parent[s2]
                        path.append(a2)
                    return path[::-1]
                if len(parent) > max_nodes:
                    raise SokobanSolverLimit(
                        f"Sokoban BFS visited more than max_nodes={max_nodes} states at depth {depth} "
                        f"without finding a solution; raise max_nodes or use a smaller level")
                nxt.append(s2)
        frontier = nxt
    return None


_PUSH_SIDE = {"up": "below", "down": "above", "left": "right", "right": "left"}


class SokobanEnv(_TurnEnv):
    """Sokoban with gym-sokoban's rewards: -0.1 per step, +1 box onto a target, -1 box off a target,
    +10 when all boxes are on targets (terminated); truncated after max_steps turns.

    Default level distribution: 6x6 room (border walls included), 0-2 random inner walls, 1 box, kept only
    when the BFS-optimal solution takes 1-8 moves. Why 1-8: measured on this project's ~5M Qwen2.5-VL
    (shared/notes/sokoban_sft_calibration.md), 2-3 minutes of SFT on such levels gives 20-50% success:
    well above the ~5% below which self-improvement fails (GTR_TURBO.md section 5) and well below the
    ceiling, so RL has room to show a gain. Longer levels leave the tiny model near 0%.

    The generator draws only from `self.np_random`, seeded by `reset(seed=...)`. `reset(options={"level":
    xsb})` loads any rectangular XSB level instead (the split does not apply to it); the image size follows
    the level size. render() in ansi mode returns the current state as XSB.
    """

    action_names = list(MOVES)

    def __init__(self, render_mode=None, dim_room=(6, 6), num_boxes=1, max_steps=15,
                 min_solution_len=1, max_solution_len=8, inner_walls=2, split=None,
                 max_nodes=200_000, max_tries=20_000):
        super().__init__(render_mode, max_steps, split)
        h, w = int(dim_room[0]), int(dim_room[1])
        if h < 3 or w < 3 or (h - 2) * (w - 2) < 2 * num_boxes + 1 + inner_walls:
            raise ValueError(f"dim_room {dim_room} too small for {num_boxes} boxes and {inner_walls} walls")
        if num_boxes < 1 or not 0 <= min_solution_len <= max_solution_len:
            raise ValueError("need num_boxes >= 1 and 0 <= min_solution_len <= max_solution_len")
        self.dim_room, self.num_boxes, self.inner_walls = (h, w), int(num_boxes), int(inner_walls)
        self.min_solution_len, self.max_solution_len = int(min_solution_len), int(max_solution_len)
        self.max_nodes, self.max_tries = int(max_nodes), int(max_tries)
        self._set_obs_space((_pad32(h * CELL), _pad32(w * CELL), 3))
        self._load(*self._blank_level())

    def _blank_level(self):
        h, w = self.dim_room
        walls = np.ones((h, w), bool)
        walls[1:-1, 1:-1] = False
        return walls, {w + 1}, {w + 2}, w + 3

    def _load(self, walls, targets, boxes, player):
        self.walls = walls
        self.h, self.w = walls.shape
        self.nbr = _neighbours(~walls)
        self.targets = frozenset(targets)
        self.boxes = frozenset(boxes)
        self.player = int(player)
        self.live = live_cells(self.nbr, self.targets)
        self._solution_cache = {}
        self._set_obs_space((_pad32(self.h * CELL), _pad32(self.w * CELL), 3))

    def _generate(self):
        """Random placement until a level of the wanted split and optimal length shows up."""
        h, w = self.dim_room
        interior = [r * w + c for r in range(1, h - 1) for c in range(1, w - 1)]
        for _ in range(self.max_tries):
            k = int(self.np_random.integers(0, self.inner_walls + 1))
            cells = self.np_random.choice(len(interior), size=k + 2 * self.num_boxes + 1, replace=False)
            cells = [interior[i] for i in cells]
            walls = np.ones((h, w), bool)
            walls[1:-1, 1:-1] = False
            walls.flat[cells[:k]] = True
            targets = set(cells[k:k + self.num_boxes])
            boxes = set(cells[k + self.num_boxes:k + 2 * self.num_boxes])
            player = cells[-1]
            if not split_accepts(to_xsb(walls, targets, boxes, player), self.split):
                continue
            nbr = _neighbours(~walls)
            try:
                sol = solve_sokoban(nbr, targets, boxes, player, self.max_nodes, self.max_solution_len)
            except SokobanSolverLimit:
                continue
            if sol is not None and len(sol) >= self.min_solution_len:
                return walls, targets, boxes, player
        raise RuntimeError(f"no Sokoban level of {self.dim_room} with {self.num_boxes} boxes, optimal length "
                           f"{self.min_solution_len}-{self.max_solution_len} and split={self.split!r} in "
                           f"{self.max_tries} tries; widen the length range")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and options.get("level") is not None:
            self._load(*parse_xsb(options["level"]))
        else:
            self._load(*self._generate())
        self.steps = 0
        self.level = to_xsb(self.walls, self.targets, self.boxes, self.player)
        return self._obs(), self._info()

    def step(self, action):
        a = int(action)
        if not 0 <= a < 4:
            raise ValueError(f"Sokoban action must be in 0..3, got {action}")
        self.player, self.boxes, pushed = sokoban_move(self.nbr, self.player, self.boxes, a)
        reward = -0.1
        if pushed is not None:
            reward += (pushed[1] in self.targets) - (pushed[0] in self.targets)
        solved = self.boxes == self.targets
        if solved:
            reward += 10.0
        self.steps += 1
        truncated = not solved and self.steps >= self.max_steps
        return self._obs(), float(reward), solved, truncated, self._info(solved)

    def _info(self, success=False):
        info = super()._info(success)
        info["boxes_on_target"] = len(self.boxes & self.targets)
        return info

    def _obs(self):
        kinds = np.where(self.walls, WALL, FLOOR).ravel()
        for t in self.targets:
            kinds[t] = TARGET
        for b in self.boxes:
            kinds[b] = BOX_ON_TARGET if b in self.targets else BOX
        kinds[self.player] = PLAYER_ON_TARGET if self.player in self.targets else PLAYER
        return draw_grid(kinds.reshape(self.h, self.w))

    def _text(self):
        return to_xsb(self.walls, self.targets, self.boxes, self.player)

    # -- privileged knowledge ---------------------------------------------------------------------

    def solve(self, player=None, boxes=None):
        """Optimal move list from the current (or a given) state; None if unsolvable."""
        key = (self.player if player is None else player, self.boxes if boxes is None else frozenset(boxes))
        if key not in self._solution_cache:
            self._solution_cache[key] = solve_sokoban(self.nbr, self.targets, key[1], key[0],
                                                      self.max_nodes, live=self.live)
        return self._solution_cache[key]

    def optimal_actions(self) -> set:
        """All moves that start some shortest solution from the current state (empty if unsolvable)."""
        sol = self.solve()
        if not sol:
            return set()
        best = set()
        for a in range(4):
            p2, b2, _ = sokoban_move(self.nbr, self.player, self.boxes, a)
            if p2 == self.player:
                continue
            rest = [] if b2 == self.targets else self.solve(p2, b2)
            if rest is not None and len(rest) + 1 == len(sol):
                best.add(a)
        return best

    def prompt(self) -> str:
        return "Sokoban: you blue, push brown boxes onto red targets. JSON thoughts, action."

    def expert_answer(self) -> str:
        """A JSON answer: the positions the image shows, the next push and the first optimal move."""
        facts = [f"player {_pos(self.player, self.w)}"]
        facts += [f"box {_pos(b, self.w)}" for b in sorted(self.boxes)]
        facts += [f"target {_pos(t, self.w)}" for t in sorted(self.targets)]
        sol = self.solve()
        if not sol:
            move = 0
            facts.append("no solution so up." if sol is None else "all boxes on targets so up.")
        else:
            move = sol[0]
            # Find the first push of the plan: the thought says which push the move prepares.
            p, bx = self.player, self.boxes
            for a in sol:
                p2, bx2, pushed = sokoban_move(self.nbr, p, bx, a)
                if pushed is not None:
                    break
                p, bx = p2, bx2
            box = "" if len(self.boxes) == 1 else f" box {_pos(pushed[0], self.w)}"
            d = MOVES[a]
            if p == self.player:
                facts.append(f"push{box} {d} now so {d}.")
            else:
                facts.append(f"push{box} {d} from {_PUSH_SIDE[d]} so {MOVES[move]}.")
        return answer_json({"thoughts": " ".join(facts), "action": MOVES[move]})

    def grounding(self, thought):
        """Fraction of stated positions (player/box/target) that are true now; None if none stated."""
        if not isinstance(thought, str):
            return None
        truth = {"player": {self.player}, "box": self.boxes, "target": self.targets}
        facts = [(kind, r * self.w + c, r < self.h and c < self.w)
                 for kind, r, c in position_facts(thought) if kind != "goal"]
        if not facts:
            return None
        return sum(ok and p in truth[kind] for kind, p, ok in facts) / len(facts)


# ---------------------------------------------------------------------------------------------------
# GridWorld
# ---------------------------------------------------------------------------------------------------


def grid_distances(nbr, goal: int) -> dict:
    """BFS from the goal: number of moves from each reachable cell to the goal (moves are reversible)."""
    dist, todo = {goal: 0}, deque([goal])
    while todo:
        q = todo.popleft()
        for a in range(4):
            p = nbr[q][a]
            if p >= 0 and p not in dist:
                dist[p] = dist[q] + 1
                todo.append(p)
    return dist


def solve_gridworld(nbr, player: int, goal: int):
    """Shortest list of move indices from player to goal (first optimal move at each step), or None."""
    dist = grid_distances(nbr, goal)
    if player not in dist:
        return None
    path = []
    while player != goal:
        a = next(a for a in range(4) if nbr[player][a] >= 0 and dist.get(nbr[player][a]) == dist[player] - 1)
        path.append(a)
        player = nbr[player][a]
    return path


class GridWorldEnv(_TurnEnv):
    """Walk to the goal in a small walled grid with a few obstacles: the fast task for smoke tests.

    -0.1 per step (walking into a wall or obstacle costs a step and does not move), +10 on reaching the
    goal (terminated; that step's reward is 9.9), truncated after max_steps. Layouts are always solvable.
    Canonical level text: XSB-like, `#` wall/obstacle, `.` goal, `@` player.
    """

    action_names = list(MOVES)

    def __init__(self, render_mode=None, size=6, num_obstacles=(1, 3), max_steps=15, split=None,
                 max_tries=10_000):
        super().__init__(render_mode, max_steps, split)
        self.size = int(size)
        lo, hi = int(num_obstacles[0]), int(num_obstacles[1])
        if self.size < 3 or not 0 <= lo <= hi or hi + 2 > (self.size - 2) ** 2:
            raise ValueError(f"size {size} with {num_obstacles} obstacles leaves no room to play")
        self.num_obstacles, self.max_tries = (lo, hi), int(max_tries)
        self._set_obs_space((_pad32(self.size * CELL), _pad32(self.size * CELL), 3))
        walls = np.ones((self.size, self.size), bool)
        walls[1:-1, 1:-1] = False
        self._load(walls, self.size + 1, self.size + 2)

    def _load(self, walls, player, goal):
        self.walls, self.player, self.goal = walls, int(player), int(goal)
        self.h, self.w = walls.shape
        self.nbr = _neighbours(~walls)
        self.dist = grid_distances(self.nbr, self.goal)

    def _text(self):
        chars = ["#" if wl else " " for wl in self.walls.ravel()]
        chars[self.goal] = "."
        chars[self.player] = "+" if self.player == self.goal else "@"
        return "\n".join("".join(chars[r * self.w:(r + 1) * self.w]) for r in range(self.h))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        n = self.size
        interior = [r * n + c for r in range(1, n - 1) for c in range(1, n - 1)]
        for _ in range(self.max_tries):
            k = int(self.np_random.integers(self.num_obstacles[0], self.num_obstacles[1] + 1))
            cells = [interior[i] for i in self.np_random.choice(len(interior), size=k + 2, replace=False)]
            walls = np.ones((n, n), bool)
            walls[1:-1, 1:-1] = False
            walls.flat[cells[:k]] = True
            self._load(walls, cells[k], cells[k + 1])
            if self.player in self.dist and split_accepts(self._text(), self.split):
                break
        else:
            raise RuntimeError(f"no solvable GridWorld layout for split={self.split!r} in {self.max_tries} tries")
        self.steps = 0
        self.level = self._text()
        return self._obs(), self._info()

    def step(self, action):
        a = int(action)
        if not 0 <= a < 4:
            raise ValueError(f"GridWorld action must be in 0..3, got {action}")
        q = self.nbr[self.player][a]
        if q >= 0:
            self.player = q
        self.steps += 1
        reached = self.player == self.goal
        reward = -0.1 + (10.0 if reached else 0.0)
        truncated = not reached and self.steps >= self.max_steps
        return self._obs(), float(reward), reached, truncated, self._info(reached)

    def _obs(self):
        kinds = np.where(self.walls, WALL, FLOOR).ravel()
        kinds[self.goal] = GOAL
        kinds[self.player] = PLAYER_ON_GOAL if self.player == self.goal else PLAYER
        return draw_grid(kinds.reshape(self.h, self.w))

    def optimal_actions(self) -> set:
        d = self.dist.get(self.player)
        if not d:
            return set()
        steps = [(a, self.nbr[self.player][a]) for a in range(4)]
        return {a for a, q in steps if q >= 0 and self.dist.get(q) == d - 1}

    def prompt(self) -> str:
        return "GridWorld: you blue, walk to the green goal; gray blocks. JSON thoughts, action."

    def expert_answer(self) -> str:
        opt = self.optimal_actions()
        move = min(opt) if opt else 0
        thought = (f"player {_pos(self.player, self.w)} goal {_pos(self.goal, self.w)} "
                   f"path starts {MOVES[move]} so {MOVES[move]}.")
        return answer_json({"thoughts": thought, "action": MOVES[move]})

    def grounding(self, thought):
        """Fraction of stated player/goal positions that are true now; None if none stated."""
        if not isinstance(thought, str):
            return None
        truth = {"player": self.player, "goal": self.goal}
        facts = [(kind, r * self.w + c, r < self.h and c < self.w)
                 for kind, r, c in position_facts(thought) if kind in truth]
        if not facts:
            return None
        return sum(ok and truth[kind] == p for kind, p, ok in facts) / len(facts)


# ---------------------------------------------------------------------------------------------------
# Points24
# ---------------------------------------------------------------------------------------------------

P24_ACTIONS = [str(v) for v in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]
RANK_LABELS = {1: "A", 11: "J", 12: "Q", 13: "K"}
MAX_FORMULA_TOKENS = 20
_FORMULA_TOKEN = re.compile(r"10|[1-9]|[-+*/()=]")


def card_value(rank: int) -> int:
    """gym_cards values: A=1, 2..10 at face value, J/Q/K = 10."""
    return min(int(rank), 10)


def rank_label(rank: int) -> str:
    return RANK_LABELS.get(int(rank), str(int(rank)))


def tokenize_formula(text: str):
    """'8/(3-8/3)' -> ['8', '/', '(', '3', ...]; None if it holds anything but formula tokens/spaces."""
    text = text.replace(" ", "")
    tokens = _FORMULA_TOKEN.findall(text)
    return tokens if "".join(tokens) == text else None


class _Parser:
    """Recursive descent over formula tokens, exact in Fractions.

    expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := NUMBER | '(' expr ')'
    No unary minus and no implicit multiplication: two adjacent numbers are a syntax error.
    """

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.i]
            self.i += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.i]
            self.i += 1
            rhs = self.factor()
            value = value * rhs if op == "*" else value / rhs  # Fraction / 0 raises ZeroDivisionError
        return value

    def factor(self):
        tok = self.peek()
        if tok is None:
            raise ValueError("formula ends early")
        self.i += 1
        if tok == "(":
            value = self.expr()
            if self.peek() != ")":
                raise ValueError("missing )")
            self.i += 1
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ValueError(f"unexpected token {tok!r}")


def evaluate_formula(tokens):
    """Exact value of a token list, or None if it is not a complete formula or divides by zero."""
    if not tokens or len(tokens) > 4 * MAX_FORMULA_TOKENS:
        return None
    parser = _Parser(list(tokens))
    try:
        value = parser.expr()
    except (ValueError, ZeroDivisionError):
        return None
    return value if parser.i == len(parser.tokens) else None


def _numbers(tokens):
    return sorted(int(t) for t in tokens if t.isdigit())


def _render_trees(seq):
    """All binary expression trees over the ordered number strings `seq`, as (value, node) pairs.

    A node is a number string or (left node, op, right node); values are exact Fractions. Division by
    zero is skipped.
    """
    if len(seq) == 1:
        return [(Fraction(int(seq[0])), seq[0])]
    out = []
    for k in range(1, len(seq)):
        for lv, ln in _render_trees_cached(seq[:k]):
            for rv, rn in _render_trees_cached(seq[k:]):
                out.append((lv + rv, (ln, "+", rn)))
                out.append((lv - rv, (ln, "-", rn)))
                out.append((lv * rv, (ln, "*", rn)))
                if rv:
                    out.append((lv / rv, (ln, "/", rn)))
    return out


@lru_cache(maxsize=None)
def _render_trees_cached(seq):
    return _render_trees(seq)


def _strings(node, root=True):
    """All spellings of a tree: each non-leaf child with or without parentheses."""
    if isinstance(node, str):
        return [node]
    ls, op, rs = node
    out = []
    for a in _strings(ls, False):
        for b in _strings(rs, False):
            out.append(a + op + b)
    if not root:
        out += ["(" + s + ")" for s in out]
    return out


@lru_cache(maxsize=1024)
def _solutions(hand: tuple):
    """Sorted (by tokens, then text) tuple of (tokens, text) of all 24-solutions of a sorted hand."""
    found = set()
    for perm in set(itertools.permutations(hand)):
        # The 4-value level is not cached: only sub-sequences (at most 1,110 of them) are shared.
        for value, node in _render_trees(tuple(str(v) for v in perm)):
            if value != 24:
                continue
            spellings = _strings(node)
            for s in spellings + ["(" + s + ")" for s in spellings]:
                if s not in found and evaluate_formula(tokenize_formula(s)) == 24:
                    found.add(s)
    sols = [(tuple(tokenize_formula(s)), s) for s in found]
    sols.sort(key=lambda x: (len(x[0]), x[1]))
    return tuple(sols)


def solve24(values):
    """All formula strings that make exactly 24 from the four values, each used once.

    Exhaustive over orders, the four operations and every parenthesisation (each paren pair encloses a
    binary operation; no doubled pairs, none around a single number). Sorted by (tokens, text).
    """
    values = tuple(sorted(int(v) for v in values))
    if len(values) != 4 or not all(1 <= v <= 10 for v in values):
        raise ValueError(f"solve24 needs four values in 1..10, got {values}")
    return [s for _, s in _solutions(values)]


def shortest_solution(values, prefix=()):
    """The shortest solution (fewest tokens, then lexicographically smallest) starting with `prefix`."""
    sols = _solutions(tuple(sorted(int(v) for v in values)))
    prefix = tuple(prefix)
    for tokens, s in sols:
        if tokens[:len(prefix)] == prefix:
            return s
    return None


_SUITS = "shdc"  # spades, hearts, diamonds, clubs
_FONTS = {}


def _font(size):
    from PIL import ImageFont
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


TABLE = (20, 90, 50)  # dark green table behind cards and formula


@lru_cache(maxsize=None)
def _token_tile(token: str) -> np.ndarray:
    """[16, 16, 3] uint8: one formula token in white on the table colour."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (CELL, CELL), TABLE)
    ImageDraw.Draw(img).text((CELL / 2, CELL / 2), token, fill=(255, 255, 255), font=_font(12), anchor="mm")
    return np.asarray(img)


def _suit_shape(draw, suit, x, y, s, color):
    """A small suit symbol of size s at (x, y), drawn from polygons/ellipses (no font glyphs needed)."""
    h = s / 2
    if suit == "d":
        draw.polygon([(x + h, y), (x + s, y + h), (x + h, y + s), (x, y + h)], fill=color)
    elif suit == "h":
        draw.ellipse([x, y, x + h, y + h], fill=color)
        draw.ellipse([x + h, y, x + s, y + h], fill=color)
        draw.polygon([(x, y + h * 0.6), (x + s, y + h * 0.6), (x + h, y + s)], fill=color)
    elif suit == "s":
        draw.polygon([(x + h, y), (x + s, y + h * 1.2), (x, y + h * 1.2)], fill=color)
        draw.ellipse([x, y + h * 0.7, x + h, y + h * 1.5], fill=color)
        draw.ellipse([x + h, y + h * 0.7, x + s, y + h * 1.5], fill=color)
        draw.rectangle([x + h - 1, y + h, x + h + 1, y + s], fill=color)
    else:
        q = s / 3
        for cx, cy in ((h, q), (q, 2 * q), (s - q, 2 * q)):
            draw.ellipse([x + cx - q * 0.9, y + cy - q * 0.9, x + cx + q * 0.9, y + cy + q * 0.9], fill=color)
        draw.rectangle([x + h - 1, y + h, x + h + 1, y + s], fill=color)


CARD_W, CARD_H, CARD_Y = 40, 72, 8


@lru_cache(maxsize=None)
def _card_image(rank: int, suit: str) -> np.ndarray:
    """[CARD_H, CARD_W, 3] uint8: a white card, large rank label in the middle, suit symbols in corners."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (CARD_W, CARD_H), TABLE)
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([0, 0, CARD_W - 1, CARD_H - 1], radius=4, fill=(255, 255, 255), outline=(0, 0, 0))
    color = (200, 20, 20) if suit in "hd" else (0, 0, 0)
    draw.text((CARD_W / 2, CARD_H / 2), rank_label(rank), fill=color, font=_font(26), anchor="mm")
    _suit_shape(draw, suit, 3, 3, 9, color)
    _suit_shape(draw, suit, CARD_W - 12, CARD_H - 12, 9, color)
    return np.asarray(img)


class Points24Env(_TurnEnv):
    """Points24 with gym_cards rules: build a formula equal to 24 from four cards, one token per turn.

    Actions (17): `1`..`10`, `+ - * / ( ) =` appended to the formula. Rewards: a number used more often
    than dealt: -1, terminated; `=`: +10 if the formula is exactly 24 (Fractions) and uses all four
    cards, else -1 (also for invalid syntax or division by zero), terminated; a 21st token: -1 and
    truncated; 0 otherwise. `max_steps` counts turns, skipped (invalid) turns included.
    Cards are dealt from a 52-card deck; `solvable_only=False` by default, like the paper (73% of deals
    are solvable). Image 192x128: four cards on top, the formula one token per 16x16 cell below (rows
    at y=96 and y=112, 12 cells each). `reset(options={"cards": [ranks 1..13]})` deals given cards.
    """

    action_names = list(P24_ACTIONS)
    answer_keys = ("cards", "formula", "thoughts", "action")
    H, W = 128, 192

    def __init__(self, render_mode=None, solvable_only=False, max_steps=25, split=None, max_tries=10_000):
        super().__init__(render_mode, max_steps, split)
        self.solvable_only, self.max_tries = bool(solvable_only), int(max_tries)
        self._set_obs_space((self.H, self.W, 3))
        self._deal([(1, "s"), (2, "h"), (3, "d"), (4, "c")])

    def _deal(self, cards):
        self.cards = [(int(r), s) for r, s in cards]
        self.values = [card_value(r) for r, _ in self.cards]
        self.hand = tuple(sorted(self.values))
        self.formula = []
        self.level = str(self.hand)
        img = np.zeros((self.H, self.W, 3), np.uint8)
        img[:] = TABLE
        x0 = (self.W - 4 * CARD_W - 3 * 6) // 2
        for i, (r, s) in enumerate(self.cards):
            x = x0 + i * (CARD_W + 6)
            img[CARD_Y:CARD_Y + CARD_H, x:x + CARD_W] = _card_image(r, s)
        self._background = img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and options.get("cards") is not None:
            ranks = [int(r) for r in options["cards"]]
            if len(ranks) != 4 or not all(1 <= r <= 13 for r in ranks):
                raise ValueError(f"options['cards'] must be four ranks in 1..13, got {options['cards']}")
            self._deal([(r, _SUITS[i]) for i, r in enumerate(ranks)])
        else:
            for _ in range(self.max_tries):
                idx = self.np_random.choice(52, size=4, replace=False)
                cards = [(int(i) % 13 + 1, _SUITS[int(i) // 13]) for i in idx]
                hand = tuple(sorted(card_value(r) for r, _ in cards))
                if split_accepts(str(hand), self.split) and (not self.solvable_only or _solutions(hand)):
                    break
            else:
                raise RuntimeError(f"no Points24 deal for split={self.split!r} in {self.max_tries} tries")
            self._deal(cards)
        self.steps = 0
        return self._obs(), self._info()

    def step(self, action):
        a = int(action)
        if not 0 <= a < len(P24_ACTIONS):
            raise ValueError(f"Points24 action must be in 0..{len(P24_ACTIONS) - 1}, got {action}")
        token = P24_ACTIONS[a]
        self.steps += 1
        reward, terminated, truncated, success = 0.0, False, False, False
        if token == "=":
            value = evaluate_formula(self.formula)
            success = value == 24 and _numbers(self.formula) == list(self.hand)
            reward, terminated = (10.0 if success else -1.0), True
        else:
            self.formula.append(token)
            if token.isdigit() and self.formula.count(token) > self.values.count(int(token)):
                reward, terminated = -1.0, True
            elif len(self.formula) > MAX_FORMULA_TOKENS:
                reward, truncated = -1.0, True
        if not (terminated or truncated) and self.steps >= self.max_steps:
            truncated = True
        return self._obs(), reward, terminated, truncated, self._info(success)

    def _obs(self):
        img = self._background.copy()
        for i, tok in enumerate(self.formula[:24]):
            y, x = 96 + (i // 12) * CELL, (i % 12) * CELL
            img[y:y + CELL, x:x + CELL] = _token_tile(tok)
        return img

    def formula_text(self) -> str:
        return "".join(self.formula)

    def _text(self):
        return f"cards: {' '.join(rank_label(r) for r, _ in self.cards)} | formula: {self.formula_text()}"

    # -- privileged knowledge ---------------------------------------------------------------------

    def _consistent(self):
        """Solutions whose tokens start with the current formula, shortest first."""
        n, prefix = len(self.formula), tuple(self.formula)
        return [(t, s) for t, s in _solutions(self.hand) if t[:n] == prefix]

    def optimal_actions(self) -> set:
        """Next tokens of the shortest consistent solutions; `=` when none is consistent (end quickly)."""
        cons = self._consistent()
        if not cons:
            return {P24_ACTIONS.index("=")}
        n, best = len(self.formula), len(cons[0][0])
        return {P24_ACTIONS.index(t[n] if len(t) > n else "=") for t, _ in cons if len(t) == best}

    def prompt(self) -> str:
        formula = self.formula_text() or "(empty)"
        return (f"Points24: make 24 with each card once (A=1, JQK=10), one token a turn, = submits. "
                f"Formula: {formula}. JSON cards, formula, thoughts, action.")

    def expert_answer(self) -> str:
        labels = [rank_label(r) for r, _ in self.cards]
        formula = self.formula_text()
        cons = self._consistent()
        thought = f"cards {' '.join(labels)}."
        if cons:
            tokens, target = cons[0]
            n = len(self.formula)
            nxt = tokens[n] if len(tokens) > n else "="
            thought += f" target {target}. next {nxt}."
        else:
            nxt = "="
            where = "" if not _solutions(self.hand) else " from here"
            thought += f" no solution{where}. next =."
        return answer_json({"cards": labels, "formula": formula, "thoughts": thought, "action": nxt})

    def grounding(self, thought):
        """Fraction true of: stated cards (multiset of values), stated formula, stated target (a 24
        solution with exactly these cards that starts with the current formula). None if none stated."""
        if not isinstance(thought, str):
            return None
        thought = thought[:MAX_JSON_CHARS]
        facts = []
        m = re.search(r"\bcards\s+([^.]*)", thought)
        if m:
            stated = re.findall(r"10|[1-9AJQK]", m.group(1).upper())
            vals = sorted(card_value({"A": 1, "J": 11, "Q": 12, "K": 13}.get(s) or int(s)) for s in stated)
            facts.append(tuple(vals) == self.hand)
        m = re.search(r"(?<!target )\bformula\s+([^.]*)", thought)
        if m:
            stated = m.group(1).strip()
            facts.append((stated in ("empty", "") and not self.formula)
                         or tokenize_formula(stated) == self.formula)
        m = re.search(r"\btarget\s+([^.]*)", thought)
        if m:
            tokens = tokenize_formula(m.group(1).strip())
            facts.append(tokens is not None and tokens[:len(self.formula)] == self.formula
                         and _numbers(tokens) == list(self.hand) and evaluate_formula(tokens) == 24)
        return sum(facts) / len(facts) if facts else None


# ---------------------------------------------------------------------------------------------------
# Registry and the lockstep batch helper
# ---------------------------------------------------------------------------------------------------

TASKS = {"sokoban": SokobanEnv, "gridworld": GridWorldEnv, "points24": Points24Env}
_IDS = {"gtr/Sokoban-v0": SokobanEnv, "gtr/GridWorld-v0": GridWorldEnv, "gtr/Points24-v0": Points24Env}
for _id, _cls in _IDS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls)


def make_env(task: str, **kw):
    """A bare env (no gymnasium wrappers) of one of TASKS."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task](**kw)


class LockstepEnvs:
    """N envs stepped together from N answer texts (the trainer's and evaluator's view of the tasks).

    Episode k (counting over all envs in reset order) is seeded with (seed * 1_000_003 + k) mod 2**31, so a
    run is reproducible and runs of different seeds see different levels. invalid="penalty": an answer
    without a legal action spends a turn without changing the state (skip_turn); invalid="random": it
    executes a uniformly random legal action (the reference code's behaviour) from this helper's own
    generator. Either way the turn's reward gets `invalid_penalty` added and action_valid is False.
    """

    def __init__(self, task, num_envs, seed, split="train", invalid="penalty", invalid_penalty=-1.0,
                 **env_kwargs):
        if invalid not in ("penalty", "random"):
            raise ValueError(f"invalid must be 'penalty' or 'random', got {invalid!r}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.task, self.seed, self.invalid = task, int(seed), invalid
        self.invalid_penalty = float(invalid_penalty)
        self.envs = [make_env(task, split=split, **env_kwargs) for _ in range(int(num_envs))]
        self.rng = np.random.default_rng(self.seed)
        self.noise_rng = np.random.default_rng([self.seed, 1])  # the noisy demonstrator's own stream
        self.next_episode = 0
        n = len(self.envs)
        self.ep_return, self.ep_len, self.ep_invalid = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.obs = [None] * n
        self.levels = [None] * n
        for i in range(n):
            self._reset(i)

    def __len__(self):
        return len(self.envs)

    def _next_seed(self) -> int:
        episode_seed = (self.seed * 1_000_003 + self.next_episode) % 2**31
        self.next_episode += 1
        return episode_seed

    def _reset(self, i, episode_seed=None):
        """New episode in env i: the next episode seed, or the one given (a group's shared level)."""
        if episode_seed is None:
            episode_seed = self._next_seed()
        self.obs[i], info = self.envs[i].reset(seed=episode_seed)
        self.levels[i] = info["level"]
        self.ep_return[i], self.ep_len[i], self.ep_invalid[i] = 0.0, 0, 0

    def observe(self):
        """-> (images: N arrays [H, W, 3] uint8, prompts: N str)."""
        return list(self.obs), [env.prompt() for env in self.envs]

    def reset_groups(self, group_size: int):
        """Start a new episode in every env, the envs in groups of `group_size` neighbours sharing one level
        (one episode seed per group): the repeated start states of a group-relative baseline."""
        n = len(self.envs)
        if group_size < 1 or n % group_size:
            raise ValueError(f"{n} envs do not split into groups of {group_size}")
        for g in range(0, n, group_size):
            episode_seed = self._next_seed()
            for i in range(g, g + group_size):
                self._reset(i, episode_seed)

    def state_keys(self) -> list[str]:
        """The full current state of each env as text (equal text = equal state): groups turns by state."""
        return [env._text() for env in self.envs]

    def step_texts(self, texts, active=None):
        """Parse and execute one answer per env. Returns numpy arrays [N] plus `episodes`.

        reward: env reward (+ invalid_penalty on invalid turns); grounding: of the answer's thought on the
        state it was given (nan if it states no fact); action: executed index, -1 if the answer was invalid.
        Finished envs are reset at once, so observe() then shows the next episode's first state.
        Episode dicts: return (sum of env rewards, penalties excluded), length, success, invalid, env, level.
        active: optional [N] bools; an inactive env is not stepped (its text is ignored, its row stays at
        reward 0, not done, invalid, action -1).
        """
        n = len(self.envs)
        if len(texts) != n:
            raise ValueError(f"need {n} texts, got {len(texts)}")
        out = {k: np.zeros(n, dt) for k, dt in (("reward", np.float64), ("terminated", bool), ("truncated", bool),
                                              ("done", bool), ("format_ok", bool), ("action_valid", bool),
                                              ("grounding", np.float64), ("action", np.int64))}
        episodes = []
        for i, (env, text) in enumerate(zip(self.envs, texts)):  # read every answer before any env moves
            if active is not None and not active[i]:
                out["grounding"][i], out["action"][i] = np.nan, -1
                continue
            action, fmt = parse_answer(text, env.action_names, env.answer_keys)
            g = env.grounding(extract_thought(text))
            out["grounding"][i] = np.nan if g is None else g
            out["format_ok"][i], out["action_valid"][i] = fmt, action is not None
            out["action"][i] = -1 if action is None else action
        for i, env in enumerate(self.envs):
            if active is not None and not active[i]:
                continue
            action = None if out["action"][i] < 0 else int(out["action"][i])
            if action is not None:
                obs, r, term, trunc, info = env.step(action)
                penalty = 0.0
            elif self.invalid == "random":
                obs, r, term, trunc, info = env.step(int(self.rng.integers(env.action_space.n)))
                penalty = self.invalid_penalty
            else:
                obs, r, term, trunc, info = env.skip_turn()
                penalty = self.invalid_penalty
            self.obs[i] = obs
            self.ep_return[i] += r
            self.ep_len[i] += 1
            self.ep_invalid[i] += action is None
            out["reward"][i] = r + penalty
            out["terminated"][i], out["truncated"][i] = term, trunc
            out["done"][i] = term or trunc
            if term or trunc:
                episodes.append({"return": float(self.ep_return[i]), "length": int(self.ep_len[i]),
                                 "success": bool(info["success"]), "invalid": int(self.ep_invalid[i]),
                                 "env": i, "level": self.levels[i]})
                self._reset(i)
        out["episodes"] = episodes
        return out

    def expert_texts(self, noise: float = 0.0):
        """One expert answer per env. noise > 0: each answer's move is, with that probability, replaced by a
        uniformly random legal move (the noisy demonstrator of the RL start, see `noisy_answer`)."""
        answers = [env.expert_answer() for env in self.envs]
        if noise <= 0:
            return answers
        flips = self.noise_rng.random(len(answers)) < noise  # [N], then one move per flip
        return [noisy_answer(a, env.action_names, self.noise_rng) if f else a
                for a, f, env in zip(answers, flips, self.envs)]

    def optimal_actions(self):
        return [env.optimal_actions() for env in self.envs]

    def state_dict(self):
        """Everything needed to continue bit-identically (pickle-able): env objects, counters, rng."""
        return copy.deepcopy({"task": self.task, "seed": self.seed, "invalid": self.invalid,
                              "invalid_penalty": self.invalid_penalty, "envs": self.envs,
                              "rng": self.rng.bit_generator.state,
                              "noise_rng": self.noise_rng.bit_generator.state, "next_episode": self.next_episode,
                              "ep_return": self.ep_return, "ep_len": self.ep_len, "ep_invalid": self.ep_invalid,
                              "obs": self.obs, "levels": self.levels})

    def load_state_dict(self, state):
        state = copy.deepcopy(state)
        if state["task"] != self.task or len(state["envs"]) != len(self.envs):
            raise ValueError(f"state is for {len(state['envs'])} {state['task']} envs, "
                             f"this helper has {len(self.envs)} {self.task} envs")
        for k in ("seed", "invalid", "invalid_penalty", "envs", "next_episode", "ep_return", "ep_len",
                  "ep_invalid", "obs", "levels"):
            setattr(self, k, state[k])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        if "noise_rng" in state:
            self.noise_rng.bit_generator.state = state["noise_rng"]
