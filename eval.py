"""eval.py: how well an agent plays and how it thinks, on held-out levels; run comparison; GIF replays.

What is measured (GTR_TURBO.md section 5 reports success and return; sections 2-4 describe thought collapse,
which the thought columns make visible), one row per (model, decoding):
    success        fraction of episodes solved          return       mean episode return (env rewards only)
    length         mean turns per episode               format_rate  answers that are one JSON object with all keys
    invalid_rate   answers naming no legal action       grounding    mean fraction of stated facts that are true
    distinct2      distinct / all word bigrams over all thoughts (low = templated)
    self_bleu2     mean BLEU-2 of each thought against the others (high = templated; 1.0 = all identical)
    thought_entropy  mean per-token entropy over thought tokens, at the sampling temperature (also for greedy)
    tokens         generated tokens per answer (EOS included)
Reference rows come from no model: `random` (empty thought, uniformly random legal action) and `expert` (the
privileged solver answer, env.expert_answer). For them entropy and tokens are nan.

Held-out split (env.py, `in_eval_split`): a level (Sokoban/GridWorld layout, Points24 hand) belongs to the
evaluation set iff crc32 of its canonical text is 0 mod 10. Training envs (split="train") never deal such a
level and evaluation envs (split="eval") deal only them, so no evaluated level was ever trained on. Evaluation
episode seeds are also offset (EVAL_SEED_OFFSET) from a run's training seeds. `--eval-split train` (and
train.py's) plays fresh episodes from the training distribution instead: the paper's protocol for Points24,
where a level is a hand of four cards and only 715 hands exist, so a held-out hand tests arithmetic a ~5M
model does not learn (docs/results_history.md, Points24), while the paper scores random deals.

CLI:
    python eval.py runs/X [--episodes 100] [--gif K]   final agent (+ teacher), sampled at the run's temperature
                                                        and greedy, + random and expert rows -> a markdown table
                                                        and runs/X/eval_full.json; K GIFs runs/X/replay_k.gif
    python eval.py --agent DIR --task sokoban [--out D] any directory Agent.load accepts (a real Qwen2.5-VL too)
    python eval.py compare runs/A runs/B ... [--out compare.png] [--table FILE.md]
                                                        runs grouped by method and every other setting that
                                                        differs (only seeds pooled: mean and std) -> a markdown
                                                        table and a 2x2 PNG of learning curves
Any bad input (a missing run directory, a run without checkpoint, an unloadable agent, a bad flag or value, a
bad value in the run's args.json, an output directory that does not exist) exits with status 2 and one line
`eval.py: error: ...` naming the flag or path, before any model is loaded where it can be.

JSON written here holds no NaN/Infinity (json_safe: null instead, train.py uses it too); readers take null,
and the bare NaN of older files, as a missing number.

GIF replays: one frame per turn (the state the agent saw, captioned with its thought and action) plus one final
frame showing the state the episode ended in (captioned with the outcome): frames = turns + 1. Replay k plays
the k-th episode of the evaluation level stream (the level of evaluation episode k when k < 16).

Left out: statistical tests between methods, videos (GIF only), per-level breakdowns.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np
import torch

from env import answer_json, extract_thought as env_extract_thought

EVAL_SEED_OFFSET = 1_000_000  # evaluation episode seeds never coincide with a training run's seeds
SPLITS = ("eval", "train")
GIF_SCALE = 4                 # env image enlarged 4x (nearest neighbour) in replays


def json_safe(obj):
    """A copy of obj (nested dicts, lists, tuples) with every NaN or +-inf float replaced by None (JSON null)."""
    if isinstance(obj, (float, np.floating)):
        return obj if math.isfinite(obj) else None  # json.dumps would write NaN/Infinity: not JSON
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(json_safe(v) for v in obj)
    return obj


def num(x) -> float:
    """A number read back from JSON: null (json_safe's NaN/inf) and a missing value are NaN."""
    return float("nan") if x is None else float(x)


# ----------------------------------------------------------------------------------------------------------
# Thought diversity (own code, word level)


def extract_thought(text: str) -> str:
    """The value of "thoughts" in an answer (env.extract_thought: JSON escapes decoded); for broken JSON, the
    text before the last "action" key, so a malformed answer still counts with what it said."""
    if not isinstance(text, str):
        return ""
    thought = env_extract_thought(text)
    if thought is not None:
        return thought
    cut = text.rfind('"action"')
    return text[:cut] if cut >= 0 else text


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts, n=2) -> float:
    """Distinct n-grams / all n-grams over the whole set of texts (Li et al. 2016). 0 if none at all."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _max_counts(counters):
    """Elementwise max of Counters: BLEU clips a hypothesis n-gram count at its max count in any reference."""
    out = Counter()
    for c in counters:
        for g, k in c.items():
            if k > out[g]:
                out[g] = k
    return out


def bleu2(hyp, refs, _ref_counts=None) -> float:
    """Sentence BLEU-2 of one word list against several: geometric mean of the clipped 1- and 2-gram precisions
    times the brevity penalty exp(1 - r/c) when c <= r (r = the reference length closest to c, ties to the
    shorter). No smoothing: a zero precision gives 0."""
    if not hyp or not refs:
        return 0.0
    logs = []
    for n in (1, 2):
        h = Counter(ngrams(hyp, n))
        if not h:
            return 0.0
        max_ref = _ref_counts[n] if _ref_counts else _max_counts(Counter(ngrams(r, n)) for r in refs)
        clipped = sum(min(c, max_ref[g]) for g, c in h.items())
        if clipped == 0:
            return 0.0
        logs.append(math.log(clipped / sum(h.values())))
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(sum(logs) / 2)


def self_bleu2(texts, max_texts=200) -> float:
    """Mean BLEU-2 of each text against all the others (Zhu et al. 2018); 1.0 = all identical, nan for < 2
    texts. Over more than `max_texts` texts an evenly spaced subsample is used (the cost is quadratic)."""
    if len(texts) > max_texts:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, max_texts).round().astype(int)]
    words = [t.split() for t in texts]
    if len(words) < 2:
        return float("nan")
    counts = {n: [Counter(ngrams(w, n)) for w in words] for n in (1, 2)}  # each text's n-grams counted once
    scores = []
    for i, w in enumerate(words):
        refs = words[:i] + words[i + 1:]
        ref_counts = {n: _max_counts(c for j, c in enumerate(counts[n]) if j != i) for n in (1, 2)}
        scores.append(bleu2(w, refs, ref_counts))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------
# Actors: (images, prompts, envs, rows) -> (answer texts, thought entropy [len(rows)], tokens [len(rows)])


class AgentActor:
    """Answers with an Agent: sampled at `temperature` (with the run's top-k / repetition penalty), or greedy.
    Greedy still reports the thought entropy of the distribution at `temperature`."""

    def __init__(self, agent, temperature=1.0, greedy=False, max_new_tokens=64, top_k=0, repetition_penalty=1.0):
        self.agent, self.temperature, self.greedy, self.max_new_tokens = agent, temperature, greedy, max_new_tokens
        self.top_k, self.repetition_penalty = top_k, repetition_penalty

    def __call__(self, images, prompts, envs, rows):
        with torch.no_grad():
            b = self.agent.sample(images, prompts, temperature=self.temperature, do_sample=not self.greedy,
                                  max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                                  repetition_penalty=self.repetition_penalty)
        # one device->host copy per turn for the whole batch, not per row
        return b.texts, b.thought_entropy.float().cpu().numpy(), b.gen_mask.sum(-1).float().cpu().numpy()


class RandomActor:
    """A valid answer with an empty thought and a uniformly random legal action."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, images, prompts, envs, rows):
        texts = []
        for i in rows:
            env = envs.envs[i]
            answer = {k: "" for k in env.answer_keys}
            answer["action"] = env.action_names[self.rng.integers(len(env.action_names))]
            texts.append(answer_json(answer))
        nan = np.full(len(rows), np.nan)  # no model: no entropy, no tokens
        return texts, nan, nan.copy()


class ExpertActor:
    """The privileged solver answer (env.expert_answer): an upper reference, grounding 1 by construction."""

    def __call__(self, images, prompts, envs, rows):
        texts = [envs.envs[i].expert_answer() for i in rows]
        nan = np.full(len(rows), np.nan)
        return texts, nan, nan.copy()


# ----------------------------------------------------------------------------------------------------------
# Playing episodes


def play(actor, task, episodes, seed, num_envs=16, env_kwargs=None, record=None, split="eval"):
    """Run exactly `episodes` episodes, held-out ones by default (split="eval"; "train" deals from the training
    distribution, the paper's protocol for Points24). Env i plays episodes i, i+num_envs, ...; an env that has
    met its quota idles, so short episodes are not over-represented. Returns (episode dicts, turn dicts).

    `record`: a list to which env 0's turns are appended as dicts {"episode", "frame" (HxWx3 uint8, scaled
    GIF_SCALE), "caption", "final"}; after each of env 0's episodes one more entry with final=True shows the
    state the episode ended in (the envs auto-reset, so it is replayed on a copy of env 0)."""
    from env import LockstepEnvs
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    num_envs = max(1, min(num_envs, episodes))
    envs = LockstepEnvs(task, num_envs, seed=seed + EVAL_SEED_OFFSET, split=split, **(env_kwargs or {}))
    quota = np.array([len(range(i, episodes, num_envs)) for i in range(num_envs)])
    done_count = np.zeros(num_envs, dtype=int)
    eps, turns = [], []
    turn_in_episode = 0
    while (done_count < quota).any():
        rows = [i for i in range(num_envs) if done_count[i] < quota[i]]
        images, prompts = envs.observe()
        texts, entropy, ntok = actor([images[i] for i in rows], [prompts[i] for i in rows], envs, rows)
        all_texts = [""] * num_envs  # idle envs get an empty answer: their extra turns are never counted
        for j, i in enumerate(rows):
            all_texts[i] = texts[j]
        recording = record is not None and done_count[0] < quota[0]
        if recording:
            env0 = envs.envs[0]
            before = copy.deepcopy(env0)
            frame = env0.render_image(scale=GIF_SCALE)
        out = envs.step_texts(all_texts)
        if recording:
            turn_in_episode += 1
            a = int(out["action"][0])
            name = env0.action_names[a] if a >= 0 else "INVALID (turn skipped)"
            record.append({"episode": int(done_count[0]), "frame": frame, "final": False,
                           "caption": f"turn {turn_in_episode}: {extract_thought(all_texts[0]).strip()} "
                                      f"-> action: {name} (reward {out['reward'][0]:+.1f})"})
        for j, i in enumerate(rows):
            turns.append({"format_ok": bool(out["format_ok"][i]), "action_valid": bool(out["action_valid"][i]),
                          "grounding": float(out["grounding"][i]), "entropy": float(entropy[j]),
                          "tokens": float(ntok[j]), "thought": extract_thought(texts[j])})
        for e in out["episodes"]:
            i = e["env"]
            if done_count[i] >= quota[i]:
                continue
            eps.append(e)
            if recording and i == 0:
                a = int(out["action"][0])
                before.step(a) if a >= 0 else before.skip_turn()  # the terminal state, lost to auto-reset
                outcome = "solved" if e["success"] else "not solved"
                record.append({"episode": int(done_count[0]), "frame": before.render_image(scale=GIF_SCALE),
                               "final": True, "caption": f"end: {outcome} in {e['length']} turns, "
                                                         f"return {e['return']:+.1f}"})
                turn_in_episode = 0
            done_count[i] += 1
    return eps, turns


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def summarize(eps, turns) -> dict:
    """Episode and turn dicts (from `play`) -> one row of the metrics in the module docstring."""
    thoughts = [t["thought"] for t in turns if t["thought"].strip()]
    return {
        "episodes": len(eps),
        "success": float(np.mean([e["success"] for e in eps])) if eps else float("nan"),
        "return": float(np.mean([e["return"] for e in eps])) if eps else float("nan"),
        "length": float(np.mean([e["length"] for e in eps])) if eps else float("nan"),
        "format_rate": float(np.mean([t["format_ok"] for t in turns])) if turns else float("nan"),
        "invalid_rate": 1.0 - float(np.mean([t["action_valid"] for t in turns])) if turns else float("nan"),
        "grounding": _mean([t["grounding"] for t in turns]),   # turns that state no checkable fact are nan
        "distinct2": distinct_n(thoughts, 2),
        "self_bleu2": self_bleu2(thoughts),
        "thought_entropy": _mean([t["entropy"] for t in turns]),
        "tokens": _mean([t["tokens"] for t in turns]),
    }


@contextlib.contextmanager
def seeded(seed, device):
    """Sampling seeded for reproducibility without disturbing the caller's RNG streams (train.py's)."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed + EVAL_SEED_OFFSET)
        yield


def evaluate(agent, task, episodes=100, seed=0, temperature=1.0, greedy=False, max_new_tokens=64, env_kwargs=None,
             top_k=0, repetition_penalty=1.0, num_envs=16, split="eval"):
    """Held-out evaluation of an Agent -> the summary dict above. Same seed -> same levels (and samples)."""
    actor = AgentActor(agent, temperature, greedy, max_new_tokens, top_k, repetition_penalty)
    with seeded(seed, agent.device):
        return summarize(*play(actor, task, episodes, seed, num_envs=num_envs, env_kwargs=env_kwargs, split=split))


def reference_rows(task, episodes=100, seed=0, env_kwargs=None, split="eval") -> dict:
    """Rows from no model: the random-action agent and the expert (solver) agent, on the same levels."""
    return {"random": summarize(*play(RandomActor(seed), task, episodes, seed, env_kwargs=env_kwargs, split=split)),
            "expert": summarize(*play(ExpertActor(), task, episodes, seed, env_kwargs=env_kwargs, split=split))}


COLUMNS = ("success", "return", "length", "format_rate", "invalid_rate", "grounding", "distinct2", "self_bleu2",
           "thought_entropy", "tokens")


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(rows: dict) -> str:
    """{name: summary} -> a markdown table a user can paste (n/a where a metric does not apply)."""
    head = "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(_fmt(r.get(c, float("nan"))) for c in COLUMNS) + " |\n"
                          for name, r in rows.items())


# ----------------------------------------------------------------------------------------------------------
# GIF replays


def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font, no size
        return ImageFont.load_default()


def wrap_pixels(text, font, width) -> list[str]:
    """Greedy word wrap to `width` pixels of `font`; a word longer than a line is cut by characters."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = word if not line else line + " " + word
            if font.getlength(cand) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:  # hard-cut an over-long token
                k = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:k])
                word = word[k:]
            line = word
        lines.append(line)
    return lines


def captioned_frames(entries, min_width=320, max_lines=12) -> list:
    """Record entries -> PIL images of one size: the frame on top (centred), the wrapped caption below."""
    from PIL import Image, ImageDraw
    font = _font()
    width = max(min_width, max(e["frame"].shape[1] for e in entries))
    line_h = font.getbbox("Hg")[3] + 3
    wrapped = []
    for e in entries:
        lines = wrap_pixels(e["caption"], font, width - 8)
        wrapped.append(lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines)
    frame_h = max(e["frame"].shape[0] for e in entries)
    height = frame_h + 8 + line_h * max(len(w) for w in wrapped)  # every frame the same size (GIF)
    images = []
    for e, lines in zip(entries, wrapped):
        img = Image.new("RGB", (width, height), (255, 255, 255))
        f = e["frame"]
        img.paste(Image.fromarray(f), ((width - f.shape[1]) // 2, 0))
        draw = ImageDraw.Draw(img)
        for k, line in enumerate(lines):
            draw.text((4, frame_h + 4 + k * line_h), line, fill=(0, 0, 0), font=font)
        images.append(img)
    return images


def write_gif(entries, path, ms_per_frame=900) -> int:
    """One episode's record entries -> an animated GIF that loops; returns the number of frames written.
    Captions carry the turn number, so no two frames are identical (Pillow would merge identical ones)."""
    images = captioned_frames(entries)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return len(images)


def write_replays(actor, task, n, seed, out_dir, env_kwargs=None, split="eval") -> list[dict]:
    """Play the first `n` episodes of the evaluation stream one at a time and write out_dir/replay_k.gif for each.
    Returns [{file, length, success, return, frames}]."""
    record = []
    eps, _ = play(actor, task, n, seed, num_envs=1, env_kwargs=env_kwargs, record=record, split=split)
    out = []
    for k, e in enumerate(eps):
        path = os.path.join(out_dir, f"replay_{k}.gif")
        frames = write_gif([r for r in record if r["episode"] == k], path)
        out.append({"file": path, "length": e["length"], "success": e["success"], "return": e["return"],
                    "level": e["level"], "frames": frames})
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparing runs


# args.json settings that do not define the experiment: runs differing only in these are seeds of one setting
# (seed is what a group pools; the rest say where and how fast a run ran, and how much of it was logged;
# budget_seconds is the sft baseline's per-seed match of another run's wall-clock, set by scripts/reproduce.py)
NOT_SETTINGS = ("seed", "out", "resume", "threads", "device", "world_size", "eval_episodes", "log_episodes",
                "max_skips", "budget_seconds")
CURVES = (("charts/success_rate", "success rate"), ("charts/thought_grounding", "thought grounding"),
          ("charts/thought_entropy", "thought-token entropy"), ("teacher/kl", "teacher KL (turbo methods)"))


def read_run(run_dir) -> dict:
    """args.json + metrics.jsonl (+ eval.json if present). Raises FileNotFoundError/ValueError with the path.
    Values may be null (json_safe's NaN) or, in old files, a bare NaN: readers turn both into NaN via num()."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    paths = {k: os.path.join(run_dir, k) for k in ("args.json", "metrics.jsonl", "eval.json")}
    for k in ("args.json", "metrics.jsonl"):
        if not os.path.isfile(paths[k]):
            raise FileNotFoundError(f"{run_dir}: no {k}, not a run directory written by train.py")
    try:
        with open(paths["args.json"]) as f:
            args = json.load(f)
        with open(paths["metrics.jsonl"]) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        ev = None
        if os.path.isfile(paths["eval.json"]):
            with open(paths["eval.json"]) as f:
                ev = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: unreadable run files ({e})") from None
    if not metrics:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty (no update finished yet)")
    return {"dir": run_dir, "args": args, "metrics": metrics, "eval": ev}


def run_summary(run) -> dict:
    """One run's numbers for the comparison table: held-out agent row from eval.json if present, else the
    mean over the last 5 updates of the training metrics; the SFT start's and the teacher's held-out success
    from the same eval.json (NaN where the run has none)."""
    m = run["metrics"]
    last5 = lambda key: _mean([num(r.get(key)) for r in m[-5:]])  # noqa: E731
    ev = (run["eval"] or {}).get("agent")
    if ev is not None:
        src = {k: num(ev.get(k)) for k in ("success", "return", "grounding", "thought_entropy")}
        src["source"] = "held-out" if run["args"].get("eval_split", "eval") == "eval" else "train split"
    else:
        src = {"success": last5("charts/success_rate"), "return": last5("charts/episodic_return"),
               "grounding": last5("charts/thought_grounding"), "thought_entropy": last5("charts/thought_entropy"),
               "source": "train, last 5"}
    held = lambda row: num(((run["eval"] or {}).get(row) or {}).get("success"))  # noqa: E731
    src["start"], src["teacher"] = held("start (SFT)"), held("teacher")  # same held-out levels as the agent
    wall, teacher = num(m[-1].get("charts/wall_time")), num(m[-1].get("teacher/time"))
    src["wall_time"] = wall
    src["teacher_share"] = teacher / wall if wall > 0 else float("nan")
    src["env_steps"] = m[-1].get("env_steps")
    return src


def group_runs(runs) -> dict:
    """{label: [runs]} in first-seen order. Runs are seeds of one group only if every args.json setting but
    NOT_SETTINGS agrees; the label is the method plus "(key=value, ...)" for each setting that differs between
    the runs given, and the task joins it when the runs span several tasks. Raises ValueError when a group
    would pool one seed twice (the same run given twice, or a copy)."""
    keys = sorted({k for r in runs for k in r["args"]} - set(NOT_SETTINGS) - {"method", "task"})
    differ = [k for k in keys if any(r["args"].get(k) != runs[0]["args"].get(k) for r in runs)]
    with_task = len({r["args"].get("task") for r in runs}) > 1
    groups, seen = {}, {}
    for r in runs:
        a = r["args"]
        label = str(a.get("method", "?"))
        if differ:
            label += " (" + ", ".join(f"{k}={a.get(k, '?')}" for k in differ) + ")"
        if with_task:
            label = f"{a.get('task', '?')}/{label}"
        other = seen.setdefault((label, a.get("seed")), r)
        if other is not r:
            raise ValueError(f"{other['dir']} and {r['dir']} are the same setting with the same seed "
                             f"{a.get('seed')}: a seed may count only once in a group")
        groups.setdefault(label, []).append(r)
    return groups


def _pm(xs, digits=3) -> str:
    """mean ± sample std over seeds (no ± for a single seed); nan (or null) seeds are left out."""
    xs = [num(x) for x in xs]
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}"


def compare_table(groups) -> str:
    head = ("| method | seeds | SFT start | success | source | teacher success | return | grounding "
            "| thought entropy | wall-clock (s) | teacher time share |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for label, runs in groups.items():
        s = [run_summary(r) for r in runs]
        seeds = ",".join(str(r["args"].get("seed", "?")) for r in runs)
        sources = sorted({x["source"] for x in s})
        lines.append(f"| {label} | {seeds} | {_pm([x['start'] for x in s])} | {_pm([x['success'] for x in s])} "
                     f"| {' + '.join(sources)} | {_pm([x['teacher'] for x in s])} "
                     f"| {_pm([x['return'] for x in s], 2)} | {_pm([x['grounding'] for x in s])} "
                     f"| {_pm([x['thought_entropy'] for x in s])} | {_pm([x['wall_time'] for x in s], 0)} "
                     f"| {_pm([x['teacher_share'] for x in s], 3)} |")
    return head + "\n".join(lines) + "\n"


def curve(run, key):
    """(env_steps [K], values [K]) of one metric, nan (null) updates dropped."""
    pts = [(num(r.get("env_steps")), num(r.get(key))) for r in run["metrics"]]
    pts = [(s, v) for s, v in pts if not (math.isnan(s) or math.isnan(v))]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def plot_curves(groups, path):
    """2x2 panels (CURVES) against env steps: per group the seed mean, shaded between seed min and max. Runs
    of a group are interpolated onto the env-step grid of its shortest run (the steps all of them reached).
    Written as PNG exactly at `path`, whatever its extension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = plt.get_cmap("tab10").colors
    for ax, (key, title) in zip(axes.flat, CURVES):
        for g, (label, runs) in enumerate(groups.items()):
            curves = [c for c in (curve(r, key) for r in runs) if len(c[0])]
            if not curves:
                continue  # e.g. teacher KL of ppo: no teacher, no line
            grid = min((c[0] for c in curves), key=lambda s: s[-1])
            ys = np.stack([np.interp(grid, s, v) for s, v in curves])   # [seeds, K]
            color = colors[g % len(colors)]
            ax.plot(grid, ys.mean(0), color=color, label=f"{label} (n={len(curves)})", marker="." if len(grid) < 20 else None)
            if len(curves) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2, linewidth=0)
        if not ax.lines:  # an empty box would read as a plotting bug
            ax.text(0.5, 0.5, f"no data: no run logged a finite {key}", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        ax.set_title(title)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    legend = {}  # label -> handle, from every panel: a group may have no points in the first one
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100, format="png")  # without format, "x.jpg" or "x" would change what is written
    plt.close(fig)


def check_output_file(flag, path):
    """An output file's directory must exist (a typo must not create a tree) and the path must not be one."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory, not a file")


def compare(run_dirs, png="compare.png", table_path=None) -> str:
    """Read runs, group them (group_runs), write the PNG (and the table if asked); returns the markdown table."""
    check_output_file("--out", png)
    if table_path:
        check_output_file("--table", table_path)
    groups = group_runs([read_run(d) for d in run_dirs])
    table = compare_table(groups)
    plot_curves(groups, png)
    if table_path:
        with open(table_path, "w") as f:
            f.write(table)
    return table


# ----------------------------------------------------------------------------------------------------------
# CLI


class InputError(Exception):
    """Bad user input: reported in one line, exit status 2."""


def find_run_agents(run_dir):
    """(agent dir, teacher dir or None) of a run's last checkpoint: ckpt/, else the previous one ckpt.prev/
    (there alone after a crash during the checkpoint swap), else ckpt.old/ (older versions of train.py)."""
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: no such run directory")
    for d in ("ckpt", "ckpt.prev", "ckpt.old"):
        agent = os.path.join(run_dir, d, "agent")
        if os.path.isdir(agent):
            teacher = os.path.join(run_dir, d, "teacher")
            return agent, (teacher if os.path.isdir(teacher) else None)
    raise InputError(f"{run_dir}: no checkpoint (ckpt/agent) in it; has the run finished an update?")


def load_agent(path, device, dtype):
    from agent import Agent, CheckpointError
    try:
        return Agent.load(path, device=device, dtype=dtype)
    except (CheckpointError, OSError, ValueError) as e:
        raise InputError(str(e).splitlines()[0]) from None


# Every number the eval CLI takes (also from a run's args.json): (type, test, rule in the message)
LIMITS = {"episodes": (int, lambda v: v >= 1, ">= 1"), "gif": (int, lambda v: v >= 0, ">= 0"),
          "num_envs": (int, lambda v: v >= 1, ">= 1"), "seed": (int, lambda v: v >= 0, ">= 0"),
          "max_new_tokens": (int, lambda v: v >= 1, ">= 1"), "top_k": (int, lambda v: v >= 0, ">= 0 (0 = off)"),
          "temperature": (float, lambda v: 0 < v < math.inf, "> 0 and finite"),
          "repetition_penalty": (float, lambda v: 0 < v < math.inf, "> 0 and finite")}


def check_number(name, value, where=""):
    """InputError naming the flag and the value unless `value` passes LIMITS[name]; `where` says where a value
    not given as a flag came from. A bool or a string from args.json is refused, not converted."""
    typ, ok, rule = LIMITS[name]
    right_type = not isinstance(value, bool) and isinstance(value, int if typ is int else (int, float))
    if not (right_type and ok(value)):
        kind = "an integer" if typ is int else "a number"
        raise InputError(f"--{name.replace('_', '-')} must be {kind} {rule}, got {value!r}{where}")


def check_device(device):
    """cpu, cuda or cuda:N, and CUDA only where this torch sees it: else Agent.load would fail after minutes."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this torch build sees no CUDA device (use --device cpu)")
        if int(device[5:] or 0) >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def eval_cli(ns):
    """Evaluate a run (agent + teacher) or a bare agent directory: table, eval_full.json, optional GIFs.
    Every input is checked before a model is loaded."""
    from env import TASKS
    settings = {"task": None, "seed": 0, "temperature": 1.0, "max_new_tokens": 64, "top_k": 0,
                "repetition_penalty": 1.0, "eval_split": "eval"}
    saved, args_path = {}, None
    if ns.run and ns.agent:
        raise InputError("give a run directory or --agent DIR, not both")
    if ns.run:
        agent_dir, teacher_dir = find_run_agents(ns.run)
        args_path = os.path.join(ns.run, "args.json")
        if os.path.isfile(args_path):
            try:
                with open(args_path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(f"{args_path}: unreadable ({e})") from None
            if not isinstance(saved, dict):
                raise InputError(f"{args_path}: not a JSON object of settings")
        out_dir = ns.out or ns.run
    elif ns.agent:
        if ns.task is None:
            raise InputError(f"--task is required with --agent (one of {', '.join(sorted(TASKS))})")
        if not os.path.isdir(ns.agent):
            raise InputError(f"{ns.agent}: no such agent directory")
        agent_dir, teacher_dir, out_dir = ns.agent, None, ns.out or "."
    else:
        raise InputError("give a run directory (python eval.py runs/X) or --agent DIR --task TASK")
    where = {}  # setting -> " (from RUN/args.json)" when the value was not given as a flag
    for k in settings:
        if getattr(ns, k) is not None:  # flags override the run's saved settings
            settings[k] = getattr(ns, k)
        elif k in saved:
            settings[k], where[k] = saved[k], f" (from {args_path})"
    if settings["task"] not in TASKS:
        raise InputError(f"--task must be one of {', '.join(sorted(TASKS))}, got {settings['task']!r}"
                         f"{where.get('task', '')}")
    split = settings["eval_split"]
    if split not in SPLITS:
        raise InputError(f"--eval-split must be one of {', '.join(SPLITS)}, got {split!r}{where.get('eval_split', '')}")
    for k in ("seed", "temperature", "max_new_tokens", "top_k", "repetition_penalty"):
        check_number(k, settings[k], where.get(k, ""))
    for k in ("episodes", "gif", "num_envs"):
        check_number(k, getattr(ns, k))
    check_device(ns.device)
    if ns.out and os.path.exists(ns.out) and not os.path.isdir(ns.out):
        raise InputError(f"--out {ns.out}: is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    task, seed, T = settings["task"], settings["seed"], float(settings["temperature"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns.dtype]
    models = {"agent": load_agent(agent_dir, ns.device, dtype)}
    if teacher_dir and not ns.no_teacher:
        models["teacher"] = load_agent(teacher_dir, ns.device, dtype)

    rows = {}
    kw = dict(max_new_tokens=settings["max_new_tokens"], top_k=settings["top_k"],
              repetition_penalty=float(settings["repetition_penalty"]), num_envs=ns.num_envs, split=split)
    for name, model in models.items():
        for greedy in (False, True):
            label = f"{name} ({'greedy' if greedy else f'T={T:g}'})"
            rows[label] = evaluate(model, task, ns.episodes, seed=seed, temperature=T, greedy=greedy, **kw)
            print(f"{label}: success {rows[label]['success']:.3f}", file=sys.stderr)
    rows.update(reference_rows(task, ns.episodes, seed, split=split))
    table = format_table(rows)
    what, split_meta = (("held-out episodes (split=eval)", "eval (crc32 % 10 == 0)") if split == "eval" else
                        ("episodes from the training distribution (split=train)", "train"))
    print(f"{task}, {ns.episodes} {what}, seed {seed}\n\n{table}")

    replays = []
    if ns.gif:
        actor = AgentActor(models["agent"], T, False, kw["max_new_tokens"], kw["top_k"], kw["repetition_penalty"])
        with seeded(seed, ns.device):
            replays = write_replays(actor, task, ns.gif, seed, out_dir, split=split)
        for r in replays:
            print(f"wrote {r['file']}: {r['length']} turns + final frame, success {r['success']}")
    result = {"meta": {"task": task, "episodes": ns.episodes, "seed": seed, "split": split_meta,
                       "agent": agent_dir, "teacher": teacher_dir if "teacher" in models else None, **settings},
              "rows": rows, "replays": replays}
    path = os.path.join(out_dir, "eval_full.json")
    with open(path, "w") as f:  # NaN metrics (e.g. entropy of the random row) become null: valid JSON
        json.dump(json_safe(result), f, indent=2, allow_nan=False)
    print(f"wrote {path}", file=sys.stderr)
    return result


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, `--episodes abc`, a missing value) are one InputError line
    instead of a usage block."""

    def error(self, message):
        raise InputError(message)


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def join_negative_numbers(argv) -> list[str]:
    """["--seed", "-1e-5"] -> ["--seed=-1e-5"]: argparse takes "-1e-5" or "-inf" for a flag and would report
    a missing value instead of letting the check name the bad number."""
    out = []
    for a in map(str, argv):
        prev = out[-1] if out else ""
        if prev.startswith("--") and len(prev) > 2 and "=" not in prev and a.startswith("-") and _is_number(a):
            out[-1] = f"{prev}={a}"
        else:
            out.append(a)
    return out


def eval_parser():
    p = Parser(prog="eval.py", description="Held-out evaluation of a run or an agent directory "
               "(python eval.py compare ... compares runs).")
    p.add_argument("run", nargs="?", help="run directory written by train.py (runs/X)")
    p.add_argument("--agent", help="evaluate a bare agent directory instead (anything Agent.load accepts)")
    p.add_argument("--task", help="task (default: the run's; required with --agent)")
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes per row")
    p.add_argument("--seed", type=int, help="evaluation seed (default: the run's seed, 0 with --agent)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the run's, 1.0 with --agent)")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap (default: the run's, 64 with --agent)")
    p.add_argument("--top-k", type=int, help="top-k at sampling, 0 = off (default: the run's)")
    p.add_argument("--repetition-penalty", type=float, help="(default: the run's, 1.0 with --agent)")
    p.add_argument("--eval-split", help="eval: held-out levels | train: the training distribution "
                                        "(default: the run's, eval with --agent)")
    p.add_argument("--gif", type=int, default=0, help="write this many GIF replays replay_k.gif")
    p.add_argument("--out", help="where eval_full.json and GIFs go (default: the run dir; cwd with --agent)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher rows")
    p.add_argument("--num-envs", type=int, default=16, help="episodes played in parallel (batch size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights dtype")
    return p


def compare_parser():
    p = Parser(prog="eval.py compare", description="Compare runs: table + learning curves.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="PNG of the learning curves (its directory must exist)")
    p.add_argument("--table", help="also write the markdown table to this file (its directory must exist)")
    return p


def main(argv=None) -> int:
    argv = join_negative_numbers(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            ns = compare_parser().parse_args(argv[1:])
            try:
                table = compare(ns.runs, ns.out, ns.table)
            except (OSError, ValueError) as e:
                raise InputError(str(e)) from None
            print(table)
            print(f"wrote {ns.out}" + (f" and {ns.table}" if ns.table else ""), file=sys.stderr)
        else:
            with torch.no_grad():  # not set_grad_enabled: main() is also called in-process (tests)
                eval_cli(eval_parser().parse_args(argv))
    except InputError as e:
        print("eval.py: error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, always
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
