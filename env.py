"""env.py: the paper's three tasks (docs/method.md section 1) as gymnasium environments at this project's scale
(section 6), and LockstepEnvs, the batch of envs that train.py and eval.py play.

Each env (`SokobanEnv`, `GridWorldEnv`, `Points24Env`) reads as rules (`_random_level`, `step`), observation
(`_obs`, an RGB image, and `prompt`), expert answer (`expert_answer` and `optimal_actions`: privileged, from a
solver, for the SFT warm-up and GTR's corrector, section 3) and grounding (`grounding(thought)`: the share of a
thought's checkable facts that are true). An answer is one short JSON object, a thought and an action, because
sampling, scoring and PPO pay for every token. Coordinates in thoughts are "r,c" (row, column), 0-based,
counting the border walls, so they name the image's cells one to one. Not here: the paper's ALFWorld.
"""
from __future__ import annotations

import ast
import copy
import itertools
import json
import operator
import re
import zlib
from fractions import Fraction
from functools import lru_cache

import gymnasium as gym
import numpy as np

MOVES = ["up", "down", "left", "right"]
FORMAT_VERSION = 3  # of prompts, answers and images: a cached SFT agent of another version is not reused
MAX_JSON_CHARS = 20_000  # longer than any well-formed answer; longer text is scanned, never parsed as JSON


# --- Answers: the JSON format, the paper's parse rule (section 1), the thought and the facts it states ---

def answer_json(obj: dict) -> str:
    """An answer as compact JSON (no spaces after separators): the paper's keys in fewer tokens."""
    return json.dumps(obj, separators=(",", ":"))


def parse_answer(text, action_names, keys=("thoughts", "action")):
    """One answer -> (action index or None, format_ok); never raises.

    format_ok: the text is exactly one JSON object (whitespace around it allowed) holding every key in `keys`.
    The action is read from the text after the last `"action":`, so broken JSON works too: its value (the
    quoted string, or the raw text up to `,` `}` or a newline; at most 200 characters) must name exactly one
    distinct legal action, case-insensitively and as a whole token ("10" never counts as "1").
    """
    if not isinstance(text, str):
        return None, False
    format_ok = False
    if len(text) <= MAX_JSON_CHARS:
        try:
            obj = json.loads(text)
            format_ok = isinstance(obj, dict) and all(k in obj for k in keys)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
            pass
    starts = [m.end() for m in re.finditer(r'"action"\s*:', text)]
    if not starts:
        return None, format_ok
    rest = text[starts[-1]: starts[-1] + 200].lstrip()
    value = rest[1:].split('"', 1)[0] if rest.startswith('"') else re.split(r"[,}\n]", rest, maxsplit=1)[0]
    value, names = value.strip().lower(), [a.lower() for a in action_names]
    found = {value} if value in names else {t for t in re.findall(r"[a-z]+|\d+|[-+*/()=]", value) if t in names}
    return (names.index(found.pop()) if len(found) == 1 else None), format_ok


def extract_thought(text) -> str | None:
    """The first closed "thoughts" string in the first MAX_JSON_CHARS characters (broken JSON around it is fine),
    JSON escapes decoded where they decode; None if there is none or `text` is not a str."""
    m = re.search(r'"thoughts"\s*:\s*"((?:[^"\\]|\\.)*)"', text[:MAX_JSON_CHARS]) if isinstance(text, str) else None
    if m is None:
        return None
    try:
        return json.loads('"' + m.group(1) + '"')
    except ValueError:
        return m.group(1)


def noisy_answer(answer: str, action_names, rng) -> str:
    """The expert's answer with its move replaced by a uniformly random legal one: the thought's facts stay
    true, only its closing `so X.` (Points24 thoughts have none) and the action change. SFT on such answers
    gives a start that reads the board reliably and chooses noisily, a start RL can lift."""
    obj = json.loads(answer)
    move = action_names[int(rng.integers(len(action_names)))]
    obj["thoughts"] = re.sub(r"so [a-z0-9]+\.$", f"so {move}.", obj["thoughts"])
    obj["action"] = move
    return answer_json(obj)


def position_facts(thought: str) -> list[tuple[str, int, int]]:
    """(kind, row, col) of every "<kind> R,C" in a thought. A coordinate of more than 6 digits reads as 10**6
    (off every board), so a 5,000-digit number is a false fact, not a slow int()."""
    num = lambda s: int(s) if len(s) <= 6 else 10 ** 6  # noqa: E731
    facts = re.findall(r"\b(player|box|target|goal) (\d+),(\d+)", thought[:MAX_JSON_CHARS])
    return [(k, num(r), num(c)) for k, r, c in facts]


# --- Pictures: one 16-px cell per grid square, so that one vision patch sees one square ---

CELL = 16  # px per grid cell: the patch size of Qwen2.5-VL's vision tower
FLOOR, WALL, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET, GOAL, PLAYER_ON_GOAL = range(9)

# [9, CELL, CELL, 3] uint8, one tile per cell kind. Targets and goals colour the whole cell and the player is an
# inner square, so a target under the player stays visible.
_TILES = np.zeros((9, CELL, CELL, 3), np.uint8)
_TILES[[FLOOR, BOX, PLAYER]] = (235, 235, 235)
_TILES[[TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET]] = (230, 70, 70)
_TILES[[GOAL, PLAYER_ON_GOAL]] = (60, 190, 90)
_TILES[WALL] = (110, 110, 110)
_TILES[WALL, ::4, :] = (90, 90, 90)  # brick lines: walls differ from floor by texture too
_TILES[BOX, 1:-1, 1:-1] = (160, 100, 40)
_TILES[BOX_ON_TARGET, 2:-2, 2:-2] = (60, 170, 60)
_TILES[[PLAYER, PLAYER_ON_TARGET, PLAYER_ON_GOAL], 4:-4, 4:-4] = (40, 80, 220)


def draw_grid(kinds: np.ndarray) -> np.ndarray:
    """[h, w] cell kinds -> [H, W, 3] uint8 image, each side padded (black) up to a multiple of 32 px, as
    Qwen2.5-VL merges 2 x 2 patches into one token."""
    h, w = kinds.shape
    out = np.zeros((-(-h * CELL // 32) * 32, -(-w * CELL // 32) * 32, 3), np.uint8)
    out[: h * CELL, : w * CELL] = _TILES[kinds].transpose(0, 2, 1, 3, 4).reshape(h * CELL, w * CELL, 3)
    return out


@lru_cache(maxsize=None)
def font(size: int):
    """Pillow's built-in font at `size` px (Pillow < 10.1 has only its fixed-size bitmap font)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


# --- What the envs share: the split and the turn; for the grid tasks, rooms and position facts ---

def in_eval_split(canonical: str) -> bool:
    """A level is held out for evaluation iff crc32 of its canonical text is 0 mod 10, whatever seed dealt it."""
    return zlib.crc32(canonical.encode()) % 10 == 0


class _TurnEnv(gym.Env):
    """Levels drawn until one of the split is accepted, and the turn: counted, truncated at max_steps, or skipped.
    A subclass draws levels (`_random_level`) and plays them (`step`, `_obs`, `prompt`, ...)."""

    answer_keys = ("thoughts", "action")
    action_names: list = []
    default_eval_split = "eval"  # what train.py and eval.py score on unless told: held-out levels
    symmetric = False  # whether flipping or transposing the image leaves a state's value unchanged (train.ImageCritic)

    def __init__(self, max_steps, split, obs_shape, max_tries):
        if split not in (None, "train", "eval"):  # None deals every level
            raise ValueError(f"split must be one of (None, 'train', 'eval'), got {split!r}")
        self.max_steps, self.split, self.max_tries, self.steps = int(max_steps), split, int(max_tries), 0
        self.action_space = gym.spaces.Discrete(len(self.action_names))
        self.observation_space = gym.spaces.Box(0, 255, obs_shape, np.uint8)

    def reset(self, *, seed=None, options=None):
        """A new level of this env's split, drawn from `self.np_random` (seeded by `seed`)."""
        super().reset(seed=seed)
        for _ in range(self.max_tries):
            level = self._random_level()  # its canonical text once accepted and loaded, else None
            if level is not None:
                self.steps, self.level = 0, level
                return self._obs(), self._info()
        raise RuntimeError(f"no {type(self).__name__} level for split={self.split!r} in {self.max_tries} tries")

    def _in_split(self, canonical: str) -> bool:
        return self.split is None or in_eval_split(canonical) == (self.split == "eval")

    def _action(self, action) -> int:
        if not 0 <= int(action) < self.action_space.n:
            raise ValueError(f"{type(self).__name__} action must be in 0..{self.action_space.n - 1}, got {action}")
        return int(action)

    def _info(self, success=False):
        return {"level": self.level, "steps": self.steps, "success": bool(success)}

    def _turn(self, reward=0.0, terminated=False, truncated=False, success=False):
        """Count the turn just played -> (obs, reward, terminated, truncated, info); the max_steps-th turn
        truncates an episode that has not terminated."""
        self.steps += 1
        truncated = truncated or (not terminated and self.steps >= self.max_steps)
        return self._obs(), float(reward), terminated, truncated, self._info(success)

    def skip_turn(self):
        """Spend a turn without changing the state (an invalid answer); it counts toward max_steps."""
        return self._turn()

    def render_image(self, scale: int = 4) -> np.ndarray:
        """The observation enlarged `scale` times (nearest neighbour), e.g. for GIF replays."""
        return self._obs().repeat(int(scale), axis=0).repeat(int(scale), axis=1)


def _random_room(rng, h: int, w: int, k: int, m: int):
    """A room walled round with k inner walls on random cells, and m more distinct random free cells:
    (walls [h, w] bool, the m cells as flat indices)."""
    interior = [r * w + c for r in range(1, h - 1) for c in range(1, w - 1)]
    cells = [interior[i] for i in rng.choice(len(interior), size=k + m, replace=False)]
    walls = np.ones((h, w), bool)
    walls[1:-1, 1:-1] = False
    walls.flat[cells[:k]] = True
    return walls, cells[k:]


def _neighbours(walls: np.ndarray):
    """nbr[p][a]: flat index of the cell one move `a` from flat cell p, or -1 (a wall or off the grid)."""
    h, w = walls.shape
    return [tuple((r + dr) * w + c + dc if 0 <= r + dr < h and 0 <= c + dc < w and not walls[r + dr, c + dc]
                  else -1 for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))) for r in range(h) for c in range(w)]


def to_xsb(walls: np.ndarray, targets, boxes, player: int) -> str:
    """A state as XSB text, rows joined by newlines: '#' wall, ' ' floor, '.' target, '$' box, '*' box on a
    target, '@' player, '+' player on a target. The canonical text of Sokoban and GridWorld levels."""
    h, w = walls.shape
    chars = ["#" if walls.flat[p] else " .$*@+"[(4 if p == player else 2 * (p in boxes)) + (p in targets)]
             for p in range(h * w)]
    return "\n".join("".join(chars[r * w:(r + 1) * w]) for r in range(h))


class _GridEnv(_TurnEnv):
    """Sokoban and GridWorld: a player in a walled grid of CELL-px squares, the four moves as actions, the image
    drawn from the state's XSB text (`_KINDS`: character -> cell kind), and thoughts that state positions
    ("player 2,3"), checked against `_truth()`: {kind: set of flat cells}."""

    action_names = list(MOVES)
    # the rules read the same after flipping or transposing the grid, so a state's value nearly does too
    # (train.ImageCritic trains on flipped images)
    symmetric = True

    def _obs(self):
        kinds = [self._KINDS[ch] for ch in self.state_text().replace("\n", "")]
        return draw_grid(np.array(kinds).reshape(self.h, self.w))

    def _pos(self, p: int) -> str:
        return f"{p // self.w},{p % self.w}"  # flat cell index -> "r,c"

    def grounding(self, thought):
        """Share of the stated positions (of the kinds this task has) that are true now; None if none is."""
        if not isinstance(thought, str):
            return None
        truth = self._truth()
        facts = [(kind, r * self.w + c, r < self.h and c < self.w)
                 for kind, r, c in position_facts(thought) if kind in truth]
        return sum(ok and p in truth[kind] for kind, p, ok in facts) / len(facts) if facts else None


# --- Sokoban: rules, solver, env ---

def sokoban_move(nbr, player: int, boxes: frozenset, a: int):
    """One move -> (player, boxes, pushed: (from, to) or None); a blocked move changes nothing. A box is
    pushed when the cell behind it is free (floor or target): no chain pushes, no pulls."""
    q = nbr[player][a]
    if q < 0 or q not in boxes:  # a wall, or a free cell
        return (player if q < 0 else q), boxes, None
    r = nbr[q][a]
    if r < 0 or r in boxes:
        return player, boxes, None
    return q, (boxes - {q}) | {r}, (q, r)


def solve_sokoban(nbr, targets, boxes, player, max_depth=None):
    """BFS over (player, boxes): the shortest list of move indices that puts every box on a target; None if
    there is none (within `max_depth` moves when given)."""
    targets, start = frozenset(targets), (player, frozenset(boxes))
    if start[1] == targets:
        return []
    seen, frontier, depth = {start}, [(start, [])], 0  # frontier: the states `depth` moves away, with the moves
    while frontier and (max_depth is None or depth < max_depth):
        depth, nxt = depth + 1, []
        for (p, bx), path in frontier:
            for a in range(4):
                p2, bx2, _ = sokoban_move(nbr, p, bx, a)
                if p2 == p or (p2, bx2) in seen:  # blocked, or reached in fewer moves
                    continue
                if bx2 == targets:
                    return path + [a]
                seen.add((p2, bx2))
                nxt.append(((p2, bx2), path + [a]))
        frontier = nxt
    return None


class SokobanEnv(_GridEnv):
    """Sokoban with gym-sokoban's rewards: -0.1 per step, +1 for a box onto a target, -1 for a box off one, +10
    when every box is on a target (terminated). Levels: a dim_room room (border walls included), 0..inner_walls
    random inner walls, num_boxes boxes, kept if the optimal solution takes min_solution_len..max_solution_len
    moves. The default, 1-8 moves on 6x6, lets a few minutes of SFT start the tiny agent well above the 5% below
    which self-improvement fails (docs/method.md section 5) and leaves RL room."""

    _KINDS = dict(zip("# .$*@+", (WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET)))
    _PUSH_FROM = {"up": "below", "down": "above", "left": "right", "right": "left"}  # where the player stands

    def __init__(self, dim_room=(6, 6), num_boxes=1, max_steps=15, min_solution_len=1, max_solution_len=8,
                 inner_walls=2, split=None, max_tries=20_000):
        self.dim_room = int(dim_room[0]), int(dim_room[1])
        self.num_boxes, self.inner_walls = num_boxes, inner_walls
        self.min_solution_len, self.max_solution_len = min_solution_len, max_solution_len
        super().__init__(max_steps, split, draw_grid(np.zeros(self.dim_room, int)).shape, max_tries)

    def _load(self, walls, targets, boxes, player):
        self.walls, (self.h, self.w), self.nbr = walls, walls.shape, _neighbours(walls)
        self.targets, self.boxes, self.player = frozenset(targets), frozenset(boxes), int(player)
        self._solution_cache = {}  # (player, boxes) -> move list

    def _random_level(self):
        """Random placement, accepted if of the wanted split and optimal length."""
        n, k = self.num_boxes, int(self.np_random.integers(0, self.inner_walls + 1))
        walls, cells = _random_room(self.np_random, *self.dim_room, k, 2 * n + 1)
        self._load(walls, cells[:n], cells[n:2 * n], cells[-1])
        level = self.state_text()
        if not self._in_split(level):  # checked first: the BFS is the slow part
            return None
        sol = solve_sokoban(self.nbr, self.targets, self.boxes, self.player, self.max_solution_len)
        return level if sol is not None and len(sol) >= self.min_solution_len else None

    def step(self, action):
        self.player, self.boxes, pushed = sokoban_move(self.nbr, self.player, self.boxes, self._action(action))
        on_off = (pushed[1] in self.targets) - (pushed[0] in self.targets) if pushed else 0
        solved = self.boxes == self.targets
        return self._turn(-0.1 + on_off + (10.0 if solved else 0.0), solved, success=solved)

    def prompt(self) -> str:
        return "Sokoban: push boxes onto targets."

    def state_text(self) -> str:
        """The full state as XSB (equal text = equal state)."""
        return to_xsb(self.walls, self.targets, self.boxes, self.player)

    def solve(self, player=None, boxes=None):
        """Optimal move list from the current (or a given) state; None if unsolvable."""
        key = (self.player if player is None else player, self.boxes if boxes is None else frozenset(boxes))
        if key not in self._solution_cache:
            self._solution_cache[key] = solve_sokoban(self.nbr, self.targets, key[1], key[0])
        return self._solution_cache[key]

    def optimal_actions(self) -> set:
        """Every move that starts some shortest solution from the current state (empty if unsolvable)."""
        sol, best = self.solve(), set()
        for a in range(4 if sol else 0):
            p2, b2, _ = sokoban_move(self.nbr, self.player, self.boxes, a)
            rest = self.solve(p2, b2)
            if p2 != self.player and rest is not None and len(rest) + 1 == len(sol):  # p2 == player: blocked
                best.add(a)
        return best

    def expert_answer(self) -> str:
        """The positions the image shows, the plan's first push and the first optimal move, e.g.
        "player 2,3 box 2,2 target 3,2 push down from above so up."."""
        facts = [f"player {self._pos(self.player)}"]
        facts += [f"box {self._pos(b)}" for b in sorted(self.boxes)]
        facts += [f"target {self._pos(t)}" for t in sorted(self.targets)]
        sol = self.solve()
        if not sol:
            facts.append("no solution so up." if sol is None else "all boxes on targets so up.")
            return answer_json({"thoughts": " ".join(facts), "action": "up"})
        p, bx = self.player, self.boxes
        for a in sol:  # walk the plan to its first push: the first move prepares that push
            p2, bx2, pushed = sokoban_move(self.nbr, p, bx, a)
            if pushed is not None:
                break
            p, bx = p2, bx2
        box, d, move = ("" if len(self.boxes) == 1 else f" box {self._pos(pushed[0])}"), MOVES[a], MOVES[sol[0]]
        side = "now" if p == self.player else f"from {self._PUSH_FROM[d]}"
        facts.append(f"push{box} {d} {side} so {move}.")
        return answer_json({"thoughts": " ".join(facts), "action": move})

    def _truth(self):
        return {"player": {self.player}, "box": self.boxes, "target": self.targets}


# --- GridWorld: rules, solver (distances to the goal), env ---

class GridWorldEnv(_GridEnv):
    """Walk to the goal in a small walled room with a few obstacles: the fast task for smoke tests. -0.1 per step
    (a wall or an obstacle costs the step and does not move), +10 on reaching the goal (terminated; that step's
    reward is 9.9). Layouts are always solvable; the level text is XSB with the goal as the one target."""

    _KINDS = dict(zip("# .@+", (WALL, FLOOR, GOAL, PLAYER, PLAYER_ON_GOAL)))

    def __init__(self, size=6, num_obstacles=(1, 3), max_steps=15, split=None, max_tries=10_000):
        self.size, self.num_obstacles = int(size), num_obstacles
        super().__init__(max_steps, split, draw_grid(np.zeros((self.size, self.size), int)).shape, max_tries)

    def _load(self, walls, player, goal):
        self.walls, (self.h, self.w), self.nbr = walls, walls.shape, _neighbours(walls)
        self.player, self.goal = int(player), int(goal)
        self.dist, todo = {self.goal: 0}, [self.goal]  # BFS from the goal: moves to it from each cell
        for q in todo:  # todo grows as it is read: a FIFO queue
            for p in self.nbr[q]:
                if p >= 0 and p not in self.dist:
                    self.dist[p] = self.dist[q] + 1
                    todo.append(p)

    def _random_level(self):
        """Random placement, accepted if the goal can be reached and the level is of the wanted split."""
        k = int(self.np_random.integers(self.num_obstacles[0], self.num_obstacles[1] + 1))
        walls, (player, goal) = _random_room(self.np_random, self.size, self.size, k, 2)
        self._load(walls, player, goal)
        level = self.state_text()
        return level if self.player in self.dist and self._in_split(level) else None

    def step(self, action):
        q = self.nbr[self.player][self._action(action)]
        self.player = q if q >= 0 else self.player  # -1: a wall or an obstacle, the player stays
        reached = self.player == self.goal
        return self._turn(-0.1 + (10.0 if reached else 0.0), reached, success=reached)

    def prompt(self) -> str:
        return "GridWorld: walk to the goal."

    def state_text(self) -> str:
        """The full state as XSB, the goal as the one target (equal text = equal state)."""
        return to_xsb(self.walls, {self.goal}, (), self.player)

    def optimal_actions(self) -> set:
        """Every move one step closer to the goal (empty on the goal)."""
        d = self.dist.get(self.player)
        return {a for a, q in enumerate(self.nbr[self.player]) if q >= 0 and self.dist.get(q) == d - 1} if d else set()

    def expert_answer(self) -> str:
        """The first optimal move in action order (up, down, left, right), so a state has one demonstration."""
        move = MOVES[min(self.optimal_actions(), default=0)]
        thought = f"player {self._pos(self.player)} goal {self._pos(self.goal)} path starts {move} so {move}."
        return answer_json({"thoughts": thought, "action": move})

    def _truth(self):
        return {"player": {self.player}, "goal": {self.goal}}


# --- Points24: rules (formula tokens and their exact value), solver, card pictures, env ---

P24_ACTIONS = [str(v) for v in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]
MAX_FORMULA_TOKENS = 20
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def rank_label(rank: int) -> str:
    """A, 2..10, J, Q, K: gym_cards counts A as 1 and J, Q, K as 10."""
    return {1: "A", 11: "J", 12: "Q", 13: "K"}.get(int(rank), str(int(rank)))


def tokenize_formula(text: str):
    """'8/(3-8/3)' -> ['8', '/', '(', '3', ...]; None if it holds anything but formula tokens and spaces."""
    text = text.replace(" ", "")
    tokens = re.findall(r"10|[1-9]|[-+*/()=]", text)
    return tokens if "".join(tokens) == text else None


def evaluate_formula(tokens):
    """Exact value (a Fraction) of a complete formula; None for a syntax error or a division by zero. The usual
    precedence, left to right, and parentheses; no unary minus, no implicit multiplication ("3 8" is an error).
    Python's parser builds the tree from the tokens joined by spaces, so "1" "10" stay two numbers."""
    if not tokens or len(tokens) > 4 * MAX_FORMULA_TOKENS:  # a huge stated formula would nest the parser deep
        return None

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))  # Fraction / 0 raises
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError("not a formula")  # unary minus, a call "3(4)", an empty "()", ...

    try:
        return value(ast.parse(" ".join(tokens), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _trees(nums: tuple) -> list:
    """Every expression tree over the ordered numbers `nums` (strings) as (exact value, node) pairs; a node
    is a number or (left node, op, right node). Division by zero is skipped."""
    if len(nums) == 1:
        return [(Fraction(int(nums[0])), nums[0])]
    out = []
    for k in range(1, len(nums)):
        for (lv, ln), (rv, rn) in itertools.product(_subtrees(nums[:k]), _subtrees(nums[k:])):
            out += [(lv + rv, (ln, "+", rn)), (lv - rv, (ln, "-", rn)), (lv * rv, (ln, "*", rn))]
            if rv:
                out.append((lv / rv, (ln, "/", rn)))
    return out


_subtrees = lru_cache(maxsize=None)(_trees)  # parts of hands repeat across hands; whole hands are not kept


def _spellings(node):
    """Every text of a tree: each operation with or without parentheses."""
    if isinstance(node, str):
        return [node]
    left, op, right = node
    out = [a + op + b for a in _spellings(left) for b in _spellings(right)]
    return out + ["(" + s + ")" for s in out]


@lru_cache(maxsize=1024)
def solve24(hand: tuple) -> tuple:
    """Every formula that makes exactly 24 from a sorted tuple of four values, each used once, as (tokens, text)
    pairs sorted by (number of tokens, text), the shortest first. Exhaustive over orders, operations and
    parenthesisations; a spelling whose omitted parentheses change the value is not a solution."""
    found = set()
    for perm in set(itertools.permutations(hand)):
        for value, node in _trees(tuple(str(v) for v in perm)):
            if value == 24:
                found.update(s for s in _spellings(node) if evaluate_formula(tokenize_formula(s)) == 24)
    return tuple(sorted(((tuple(tokenize_formula(s)), s) for s in found), key=lambda x: (len(x[0]), x[1])))


_SUITS = "shdc"  # spades, hearts, diamonds, clubs
TABLE = (20, 90, 50)  # the dark green table behind the cards and the formula
CARD_W, CARD_H, CARD_Y = 40, 72, 8
# The suits, 10x10 px each ('#' ink), in the order of _SUITS: pixels, so no font needs the glyphs.
_SUIT_ART = """
....#..... .###.####. ....#..... ...###....
...###.... ########## ...###.... ..#####...
..#####... ########## ..#####... .#######..
.########. ########## .########. .#######..
########## .########. ########## .#######..
########## ..######.. .########. #########.
.########. ..#####... ..######.. #########.
...###.... ...###.... ..#####... .#######..
...###.... ...###.... ...###.... ..#####...
...###.... ....#..... ....#..... ...###....
"""
_SUIT_MASK = {s: np.array([[ch == "#" for ch in row.split()[i]] for row in _SUIT_ART.split("\n")[1:-1]])
              for i, s in enumerate(_SUITS)}  # suit -> [10, 10] bool


@lru_cache(maxsize=None)
def _token_tile(token: str) -> np.ndarray:
    """[CELL, CELL, 3] uint8: one formula token in white on the table."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (CELL, CELL), TABLE)
    ImageDraw.Draw(img).text((CELL / 2, CELL / 2), token, fill=(255, 255, 255), font=font(12), anchor="mm")
    return np.asarray(img)


@lru_cache(maxsize=None)
def _card_image(rank: int, suit: str) -> np.ndarray:
    """[CARD_H, CARD_W, 3] uint8: a white card, the rank large in the middle, the suit top left and bottom right."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (CARD_W, CARD_H), TABLE)
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([0, 0, CARD_W - 1, CARD_H - 1], radius=4, fill=(255, 255, 255), outline=(0, 0, 0))
    color = (200, 20, 20) if suit in "hd" else (0, 0, 0)
    draw.text((CARD_W / 2, CARD_H / 2), rank_label(rank), fill=color, font=font(26), anchor="mm")
    card = np.array(img)
    for y, x in ((3, 3), (CARD_H - 12, CARD_W - 12)):
        card[y:y + 10, x:x + 10][_SUIT_MASK[suit]] = color
    return card


class Points24Env(_TurnEnv):
    """Points24 with gym_cards rules: build a formula equal to 24 from four cards, one token per turn.

    Actions (17): `1`..`10`, `+ - * / ( ) =`, appended to the formula. Rewards: a number used more often than
    dealt: -1, terminated; `=`: +10 if the formula is exactly 24 (in Fractions) and uses all four cards, else -1
    (a syntax error or a division by zero too), terminated; a 21st token: -1, truncated; 0 otherwise. Cards come
    from a 52-card deck; like the paper, unsolvable deals are kept unless `solvable_only` (73% of deals are
    solvable). Image 192x128: the cards on top, the formula below, one token per 16x16 cell, 12 a row.
    """

    action_names = list(P24_ACTIONS)
    answer_keys = ("cards", "formula", "thoughts", "action")
    # the paper scores Points24 on fresh deals of the training distribution: there are only 715 hands, and a held-out
    # hand asks for arithmetic a small model does not do (it recalls a formula per hand it has seen)
    default_eval_split = "train"
    H, W = 128, 192

    def __init__(self, solvable_only=False, max_steps=25, split=None, max_tries=10_000):
        self.solvable_only = bool(solvable_only)
        super().__init__(max_steps, split, (self.H, self.W, 3), max_tries)

    def _deal(self, cards):
        """Lay out `cards`, (rank 1..13, suit) pairs, with an empty formula."""
        self.cards, self.formula = [(int(r), s) for r, s in cards], []  # formula: the tokens so far
        self.hand = tuple(sorted(min(r, 10) for r, _ in self.cards))  # their values, J Q K count 10
        self._background = np.full((self.H, self.W, 3), TABLE, np.uint8)
        x0 = (self.W - 4 * CARD_W - 3 * 6) // 2  # four cards 6 px apart, centred
        for i, (r, s) in enumerate(self.cards):
            x = x0 + i * (CARD_W + 6)
            self._background[CARD_Y:CARD_Y + CARD_H, x:x + CARD_W] = _card_image(r, s)

    def _random_level(self):
        """Four cards from the deck, accepted if of the wanted split (and solvable if solvable_only)."""
        self._deal([(int(i) % 13 + 1, _SUITS[int(i) // 13]) for i in self.np_random.choice(52, 4, replace=False)])
        level = str(self.hand)
        return level if self._in_split(level) and (not self.solvable_only or solve24(self.hand)) else None

    def step(self, action):
        token = P24_ACTIONS[self._action(action)]
        if token == "=":
            success = self._makes_24(self.formula)
            return self._turn(10.0 if success else -1.0, True, success=success)
        self.formula.append(token)
        if token.isdigit() and self.formula.count(token) > self.hand.count(int(token)):
            return self._turn(-1.0, True)
        too_long = len(self.formula) > MAX_FORMULA_TOKENS
        return self._turn(-1.0 if too_long else 0.0, truncated=too_long)

    def _makes_24(self, tokens) -> bool:
        """The formula uses exactly the dealt values and is exactly 24."""
        return sorted(int(t) for t in tokens if t.isdigit()) == list(self.hand) and evaluate_formula(tokens) == 24

    def _obs(self):
        img = self._background.copy()
        for i, tok in enumerate(self.formula[:24]):
            y, x = 96 + (i // 12) * CELL, (i % 12) * CELL
            img[y:y + CELL, x:x + CELL] = _token_tile(tok)
        return img

    def prompt(self) -> str:
        return f"Points24: make 24, each card once. Formula: {''.join(self.formula) or '(empty)'}."

    def state_text(self) -> str:
        """The full state as text: the cards (their suits do not matter) and the formula."""
        return f"cards: {' '.join(rank_label(r) for r, _ in self.cards)} | formula: {''.join(self.formula)}"

    def _plans(self) -> list:
        """(next token, text) of each shortest solution that starts with the current formula, ordered by text;
        the next token of a complete formula is `=`."""
        n, prefix = len(self.formula), tuple(self.formula)
        cons = [(t, s) for t, s in solve24(self.hand) if t[:n] == prefix]
        return [(t[n] if len(t) > n else "=", s) for t, s in cons if len(t) == len(cons[0][0])]

    def optimal_actions(self) -> set:
        """The next tokens of the plans; `=` when there is none (end quickly)."""
        return {P24_ACTIONS.index(nxt) for nxt, _ in self._plans() or [("=", "")]}

    def expert_answer(self) -> str:
        """The cards, the formula so far, the first plan and its next token, e.g. thoughts "cards 3 8 3 8. target
        8/(3-8/3). next -."."""
        labels, plans = [rank_label(r) for r, _ in self.cards], self._plans()
        nxt, target = plans[0] if plans else ("=", None)
        plan = f"target {target}" if plans else f"no solution{' from here' if solve24(self.hand) else ''}"
        thought = f"cards {' '.join(labels)}. {plan}. next {nxt}."
        return answer_json({"cards": labels, "formula": "".join(self.formula), "thoughts": thought, "action": nxt})

    def grounding(self, thought):
        """Share true of the stated cards (as a multiset of values), the stated formula and the stated target
        (a 24-solution with exactly these cards that starts with the current formula); None if none stated."""
        if not isinstance(thought, str):
            return None
        thought, facts = thought[:MAX_JSON_CHARS], []
        if m := re.search(r"\bcards\s+([^.]*)", thought):
            stated = re.findall(r"10|[1-9AJQK]", m.group(1).upper())
            facts.append(tuple(sorted(1 if s == "A" else 10 if s in "JQK" else int(s) for s in stated)) == self.hand)
        if m := re.search(r"(?<!target )\bformula\s+([^.]*)", thought):
            stated = m.group(1).strip()
            facts.append((stated in ("empty", "(empty)", "") and not self.formula)  # "(empty)": the prompt's word
                         or tokenize_formula(stated) == self.formula)
        if m := re.search(r"\btarget\s+([^.]*)", thought):
            tokens = tokenize_formula(m.group(1).strip())
            facts.append(tokens is not None and tokens[:len(self.formula)] == self.formula and self._makes_24(tokens))
        return sum(facts) / len(facts) if facts else None


# --- The tasks by name, and N envs in lockstep ---

TASKS = {"sokoban": SokobanEnv, "gridworld": GridWorldEnv, "points24": Points24Env}


def make_env(task: str, **kw):
    """A bare env (no gymnasium wrappers) of one of TASKS."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task](**kw)


class LockstepEnvs:
    """N envs stepped together from N answer texts, with auto-reset: the trainer's and the evaluator's view.

    Episode k (counted over all envs in reset order) is seeded with (seed * 1_000_003 + k) mod 2**31, so a run is
    reproducible and runs of different seeds see different levels. per_env_levels: env i's j-th episode is episode
    i + j * N instead, whatever order the envs finish in: every actor evaluated meets the same levels. An answer
    without a legal action: invalid="penalty" spends a turn without changing the state (skip_turn);
    invalid="random" plays a uniformly random legal action (the reference code) from this helper's own generator.
    Either way the turn's reward gets `invalid_penalty` added and its action_valid is False."""

    def __init__(self, task, num_envs, seed, split="train", invalid="penalty", invalid_penalty=-1.0,
                 per_env_levels=False, **env_kwargs):
        if invalid not in ("penalty", "random"):
            raise ValueError(f"invalid must be 'penalty' or 'random', got {invalid!r}")
        self.task, self.seed, self.invalid, self.invalid_penalty = task, int(seed), invalid, float(invalid_penalty)
        self.envs = [make_env(task, split=split, **env_kwargs) for _ in range(int(num_envs))]
        self.rng = np.random.default_rng(self.seed)  # random actions for invalid answers
        self.noise_rng = np.random.default_rng([self.seed, 1])  # the noisy demonstrator's own stream
        n, self.next_episode, self.obs = len(self.envs), 0, [None] * len(self.envs)
        self.per_env_levels, self.resets = per_env_levels, np.zeros(n, np.int64)  # episodes begun per env
        self.ep_return, self.ep_len, self.ep_invalid = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
        for i in range(n):
            self._reset(i)

    def __len__(self):
        return len(self.envs)

    def _reset(self, i):
        """A new episode in env i, on the next episode seed."""
        k = i + len(self.envs) * int(self.resets[i]) if self.per_env_levels else self.next_episode
        self.obs[i], _ = self.envs[i].reset(seed=(self.seed * 1_000_003 + k) % 2**31)
        self.next_episode += 1
        self.resets[i] += 1
        self.ep_return[i], self.ep_len[i], self.ep_invalid[i] = 0.0, 0, 0

    def observe(self):
        """-> (images: N arrays [H, W, 3] uint8, prompts: N str)."""
        return list(self.obs), [env.prompt() for env in self.envs]

    def step_texts(self, texts):
        """Parse and play one answer per env -> dict of [N] numpy arrays, plus "episodes": a dict per finished
        episode (return: env rewards without penalties, length, success, invalid, env, level). reward: the env's,
        plus invalid_penalty on an invalid turn; grounding: of the thought on the state it was given (nan: no fact
        stated); action: the index played, -1 if invalid. A finished env is reset at once (observe() shows the
        next episode)."""
        n = len(self.envs)
        if len(texts) != n:
            raise ValueError(f"need {n} texts, got {len(texts)}")
        out = {"reward": np.zeros(n), **{k: np.zeros(n, bool) for k in ("terminated", "truncated", "done",
                                                                       "format_ok", "action_valid")},
               "grounding": np.full(n, np.nan), "action": np.full(n, -1, np.int64), "episodes": []}
        for i, (env, text) in enumerate(zip(self.envs, texts)):
            action, out["format_ok"][i] = parse_answer(text, env.action_names, env.answer_keys)
            g = env.grounding(extract_thought(text))  # on the state the answer was given
            out["grounding"][i] = np.nan if g is None else g
            valid = out["action_valid"][i] = action is not None
            out["action"][i] = action if valid else -1
            if not valid and self.invalid == "random":
                action = int(self.rng.integers(env.action_space.n))
            self.obs[i], r, term, trunc, info = env.skip_turn() if action is None else env.step(action)
            self.ep_return[i] += r
            self.ep_len[i] += 1
            self.ep_invalid[i] += not valid
            out["reward"][i] = r + (0.0 if valid else self.invalid_penalty)
            out["terminated"][i], out["truncated"][i], out["done"][i] = term, trunc, term or trunc
            if term or trunc:
                out["episodes"].append({"return": float(self.ep_return[i]), "length": int(self.ep_len[i]),
                                        "success": bool(info["success"]), "invalid": int(self.ep_invalid[i]),
                                        "env": i, "level": env.level})
                self._reset(i)
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
        """Every attribute, the generators as their states (pickle-able): enough to continue bit-identically."""
        return copy.deepcopy({**vars(self), "rng": self.rng.bit_generator.state,
                              "noise_rng": self.noise_rng.bit_generator.state})

    def load_state_dict(self, state):
        if state["task"] != self.task or len(state["envs"]) != len(self.envs):
            raise ValueError(f"state is for {len(state['envs'])} {state['task']} envs, "
                             f"this helper has {len(self.envs)} {self.task} envs")
        state = copy.deepcopy(state)
        self.rng.bit_generator.state, self.noise_rng.bit_generator.state = state.pop("rng"), state.pop("noise_rng")
        vars(self).update(state)
