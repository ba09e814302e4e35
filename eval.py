"""eval.py: how well an agent plays and how it thinks (docs/method.md section 5); run comparison; GIF replays.

Metrics, one row per (model, decoding). Section 5 reports the first two; the thought columns show the thought
collapse that GTR and GTR-Turbo guard against (sections 2-4):
    success, return   fraction of episodes solved, mean episode return (env rewards only); length in turns
    format_rate       answers that are one JSON object with all keys;  invalid_rate: answers naming no legal action
    grounding         mean fraction of the facts a thought states that are true (env.grounding)
    distinct2         distinct / all word bigrams over all thoughts (low = templated)
    self_bleu2        mean BLEU-2 of each thought against the others (high = templated; 1.0 = all identical)
    thought_entropy   mean per-token entropy of thought tokens at the sampling temperature (also for greedy)
    tokens            generated tokens per answer (EOS included)
Reference rows from no model: `random` (empty thought, random legal action) and `expert` (env.expert_answer).
Levels are held out (env.in_eval_split), episode seeds offset from training seeds; `--eval-split train` plays the
training distribution instead, Points24's default (the paper's protocol there: only 715 hands exist).
CLI: `python eval.py run runs/X` (or `--agent DIR --task T`); `python eval.py compare runs/A runs/B ...`. Bad input
exits 2 with one line `eval.py: error: ...`, before any model is loaded. Left out: statistical tests, videos.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import textwrap
from collections import Counter
from functools import reduce
from operator import or_
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from env import (BOX, BOX_ON_TARGET, CELL, GOAL, PLAYER, TARGET, TASKS, WALL, LockstepEnvs, answer_json, draw_grid,
                 extract_thought, font)

EVAL_SEED_OFFSET = 1_000_000  # evaluation episode seeds never coincide with a training run's seeds
EVAL_BATCH = 100              # episodes played at once by default: one batched model call per turn for all
COLUMNS = ("success", "return", "length", "format_rate", "invalid_rate", "grounding", "distinct2", "self_bleu2",
           "thought_entropy", "tokens")

# ----------------------------------------------------------------------------------------------------------
# Metrics


def json_safe(obj):
    """A copy of obj (nested dicts, lists, tuples) with every NaN or +-inf float replaced by None (JSON null)."""
    if isinstance(obj, (float, np.floating)):
        return obj if math.isfinite(obj) else None  # json.dumps would write NaN/Infinity: not JSON
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(json_safe(v) for v in obj)
    return obj


def write_json(path, obj):
    """obj as strict JSON (NaN and inf as null), written atomically."""
    from agent import atomic_write_text  # transformers loads only when a file is written
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))


def num(x) -> float:
    """A number read back from JSON: null (json_safe's NaN/inf) and a missing value are NaN."""
    return float("nan") if x is None else float(x)


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts, n=2) -> float:
    """Distinct n-grams / all n-grams over the whole set of texts (Li et al. 2016). 0 if none at all."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu2(texts, max_texts=200) -> float:
    """Mean sentence BLEU-2 of each text against all the others (Zhu et al. 2018); 1.0 = all identical, nan for
    < 2 texts. BLEU-2 of a text of c words: geometric mean of its clipped 1- and 2-gram precisions times the brevity
    penalty min(1, exp(1 - r/c)), r = the other length closest to c (ties to the shorter); no smoothing, so a zero
    precision gives 0. Over more than `max_texts` texts an evenly spaced subsample is used (the cost is quadratic)."""
    if len(texts) > max_texts:
        texts = [texts[i] for i in np.linspace(0, len(texts) - 1, max_texts).round().astype(int)]
    words = [t.split() for t in texts]
    grams = [[Counter(ngrams(w, n)) for n in (1, 2)] for w in words]  # each text's 1- and 2-grams, once

    def bleu(i):
        others = [j for j in range(len(words)) if j != i]
        # clipped: an n-gram counts at most as often as in the other text that has it most (Counter | and &)
        hits = [sum((grams[i][n] & reduce(or_, (grams[j][n] for j in others))).values()) for n in (0, 1)]
        if 0 in hits:  # no n-gram matched (or the text has none)
            return 0.0
        c, r = len(words[i]), min((abs(len(words[j]) - len(words[i])), len(words[j])) for j in others)[1]
        log_precisions = sum(math.log(hits[n] / sum(grams[i][n].values())) for n in (0, 1))
        return min(1.0, math.exp(1 - r / c)) * math.exp(log_precisions / 2)
    return float(np.mean([bleu(i) for i in range(len(words))])) if len(words) > 1 else float("nan")


def episode_metrics(eps, turns) -> dict:
    """Episode and turn dicts (from `play`) -> one row of the metrics in the module docstring. A mean leaves out
    nan values (a turn whose thought states no checkable fact has nan grounding); none left is nan."""
    def mean(dicts, key):
        xs = [d[key] for d in dicts if not math.isnan(d[key])]
        return float(np.mean(xs)) if xs else float("nan")
    thoughts = [t["thought"] for t in turns if t["thought"].strip()]
    return {"episodes": len(eps), "success": mean(eps, "success"), "return": mean(eps, "return"),
            "length": mean(eps, "length"), "format_rate": mean(turns, "format_ok"),
            "invalid_rate": 1.0 - mean(turns, "action_valid"), "grounding": mean(turns, "grounding"),
            "distinct2": distinct_n(thoughts, 2), "self_bleu2": self_bleu2(thoughts),
            "thought_entropy": mean(turns, "entropy"), "tokens": mean(turns, "tokens")}


def format_table(rows: dict) -> str:
    """{name: metrics row} -> a markdown table a user can paste (n/a where a metric does not apply)."""
    cell = lambda x: "n/a" if x is None or math.isnan(x) else f"{x:.3f}"  # noqa: E731
    head = "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(cell(r.get(c, float("nan"))) for c in COLUMNS) + " |\n"
                          for name, r in rows.items())


# ----------------------------------------------------------------------------------------------------------
# Evaluating: episodes played by an actor, which maps (images, prompts, envs, rows) -> (answer texts, thought
# entropy [len(rows)], generated tokens [len(rows)]) for the envs envs.envs[i], i in rows.


def evaluate(agent, task, episodes=100, seed=0, temperature=1.0, greedy=False, max_new_tokens=64, top_k=0,
             repetition_penalty=1.0, num_envs=EVAL_BATCH, split="eval", desc="eval") -> dict:
    """Evaluation of an Agent -> one row of episode_metrics. Same seed -> same levels (and samples)."""
    actor = agent_actor(agent, greedy, temperature=temperature, max_new_tokens=max_new_tokens, top_k=top_k,
                        repetition_penalty=repetition_penalty)
    with seeded(seed, agent.device):
        return episode_metrics(*play(actor, task, episodes, seed, num_envs=num_envs, split=split, desc=desc))


def reference_rows(task, episodes=100, seed=0, split="eval") -> dict:
    """Rows from no model: the random-action agent and the expert (solver) agent, on the same levels."""
    return {name: episode_metrics(*play(actor, task, episodes, seed, split=split, desc=f"eval {name}"))
            for name, actor in (("random", random_actor(seed)), ("expert", expert_actor))}


@contextlib.contextmanager
def seeded(seed, device):
    """Sampling seeded for reproducibility without disturbing the caller's RNG streams (train.py's)."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed + EVAL_SEED_OFFSET)
        yield


def agent_actor(agent, greedy=False, **decoding):
    """Answers of an Agent: sampled (decoding: temperature, max_new_tokens, top_k, repetition_penalty) or
    greedy; greedy still reports the thought entropy of the distribution at the temperature."""
    def act(images, prompts, envs, rows):
        with torch.no_grad():
            b = agent.sample(images, prompts, do_sample=not greedy, **decoding)
        # one device->host copy per turn for the whole batch, not per row
        return b.texts, b.thought_entropy.float().cpu().numpy(), b.gen_mask.sum(-1).float().cpu().numpy()
    return act


def random_actor(seed):
    """A valid answer with an empty thought and a uniformly random legal action (no model: entropy, tokens nan)."""
    rng = np.random.default_rng(seed)

    def act(images, prompts, envs, rows):
        texts = [answer_json({**dict.fromkeys(env.answer_keys, ""),
                              "action": env.action_names[rng.integers(len(env.action_names))]})
                 for env in (envs.envs[i] for i in rows)]
        return texts, np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    return act


def expert_actor(images, prompts, envs, rows):
    """The privileged solver answer (env.expert_answer): an upper reference, grounding 1 by construction."""
    return [envs.envs[i].expert_answer() for i in rows], np.full(len(rows), np.nan), np.full(len(rows), np.nan)


def play(actor, task, episodes, seed, num_envs=EVAL_BATCH, split="eval", desc="eval"):
    """Exactly `episodes` episodes of `split` ("eval": held-out levels; "train": the training distribution) ->
    (episode dicts, turn dicts), counted on a progress bar. Env i plays episodes i, i+num_envs, ... (their levels
    too: every actor meets the same levels); an env that has met its quota idles, so short episodes are not
    over-represented."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    num_envs = max(1, min(num_envs, episodes))
    envs = LockstepEnvs(task, num_envs, seed=seed + EVAL_SEED_OFFSET, split=split, per_env_levels=True)
    quota = np.array([len(range(i, episodes, num_envs)) for i in range(num_envs)])
    done = np.zeros(num_envs, dtype=int)  # episodes counted per env
    eps, turns, bar = [], [], tqdm(total=episodes, desc=desc, unit="ep", leave=False)
    while (done < quota).any():
        rows = [i for i in range(num_envs) if done[i] < quota[i]]
        images, prompts = envs.observe()
        texts, entropy, ntok = actor([images[i] for i in rows], [prompts[i] for i in rows], envs, rows)
        answers = dict(zip(rows, texts))  # idle envs answer "": their extra turns are never counted
        out = envs.step_texts([answers.get(i, "") for i in range(num_envs)])
        turns += [{"format_ok": bool(out["format_ok"][i]), "action_valid": bool(out["action_valid"][i]),
                   "grounding": float(out["grounding"][i]), "entropy": float(entropy[j]), "tokens": float(ntok[j]),
                   "thought": extract_thought(texts[j]) or ""} for j, i in enumerate(rows)]
        for e in (e for e in out["episodes"] if done[e["env"]] < quota[e["env"]]):
            eps.append(e)
            bar.update(1)
            done[e["env"]] += 1
    bar.close()
    return eps, turns


# ----------------------------------------------------------------------------------------------------------
# Comparing runs: final results from each run's eval.json, learning curves from its metrics.jsonl

# what a run whose args.json lacks these settings did (train.py --resume reads old runs the same way)
LEGACY_ARGS = {"critic": "head"}
# args.json settings that do not define the experiment, so runs differing only in these are seeds of one setting
NOT_SETTINGS = ("seed", "out", "resume", "threads", "device", "world_size", "eval_episodes", "log_episodes",
                "max_skips", "budget_seconds", "curve_every", "curve_episodes")
# settings of the merged teacher and its guidance: left out of the label of a method that has no such teacher
TEACHER_SETTINGS = ("teacher", "guide", "kl_mode", "kl_coef", "kl_clip", "kl_invalid", "kl_estimator", "merge",
                    "weighting", "ema_alpha", "density", "merge_every", "teacher_retries")
CURVES = (("charts/success_rate", "success rate"), ("charts/thought_grounding", "thought grounding"),
          ("charts/thought_entropy", "thought-token entropy"), ("teacher/kl", "teacher KL (turbo methods)"))
EVAL_CURVES = (("eval/agent_success", "success: agent"),  # drawn when a run logged them (train.py --curve-every),
               ("eval/teacher_success", "success: merged teacher"))  # titled by the runs' --eval-split


def compare(run_dirs, png="compare.png", table_path=None) -> str:
    """Read runs (one or more), group them, write the PNG (and the table if asked); returns the markdown table."""
    for flag, path in (("--out", png), ("--table", table_path)):  # checked first: a typo must not cost the plot
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            raise ValueError(f"{flag} {path}: not a file in an existing directory")
    groups = group_runs([read_run(d) for d in run_dirs])
    table = compare_table(groups)
    plot_curves(groups, png)
    if table_path:
        Path(table_path).write_text(table)
    return table


def read_run(run_dir) -> dict:
    """{dir, args, metrics, eval}: args.json (settings it lacks as LEGACY_ARGS), metrics.jsonl (a dict per update),
    eval.json (None if absent); ValueError naming the run if one is missing, unreadable or not JSON objects."""
    d = Path(run_dir)
    try:
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        run = {"dir": run_dir, "args": json.loads((d / "args.json").read_text()), "metrics": metrics,
               "eval": json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else None}
    except (OSError, ValueError) as e:  # a file missing: not a run directory written by train.py
        raise ValueError(f"{run_dir}: not a readable run directory ({e})") from None
    if not metrics:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty (no update finished yet)")
    evals = [run["eval"]] if run["eval"] is not None else []
    for name, objs in (("args.json", [run["args"]]), ("metrics.jsonl", metrics), ("eval.json", evals)):
        if not all(isinstance(o, dict) for o in objs):
            raise ValueError(f"{run_dir}: {name} is damaged (holds JSON that is not an object)")
    run["args"] = {**LEGACY_ARGS, **run["args"]}
    return run


def group_runs(runs) -> dict:
    """{label: [runs]} in first-seen order; runs are seeds of one group if every args.json setting but NOT_SETTINGS
    agrees. Label: the method, "(key=value, ...)" for each setting that differs between the runs (teacher settings
    only for turbo methods), the task if they span several. ValueError if a group would pool one seed twice."""
    keys = sorted({k for r in runs for k in r["args"]} - set(NOT_SETTINGS) - {"method", "task"})
    differ = [k for k in keys if any(r["args"].get(k) != runs[0]["args"].get(k) for r in runs)]
    with_task = len({r["args"].get("task") for r in runs}) > 1
    groups, seen = {}, {}
    for r in runs:
        a = r["args"]
        label = str(a.get("method", "?"))
        shown = [k for k in differ if not (k in TEACHER_SETTINGS and label in ("ppo", "gtr", "sft"))]
        label += " (" + ", ".join(f"{k}={a.get(k, '?')}" for k in shown) + ")" if shown else ""
        label = f"{a.get('task', '?')}/{label}" if with_task else label
        other = seen.setdefault((label, a.get("seed")), r)
        if other is not r:  # the same run given twice, or a copy of it
            raise ValueError(f"{other['dir']} and {r['dir']} are the same setting with the same seed "
                             f"{a.get('seed')}: a seed may count only once in a group")
        groups.setdefault(label, []).append(r)
    return groups


def mean_sd(xs, digits=3) -> str:
    """mean ± sample std over seeds (no ± for a single seed); nan seeds are left out, none left is n/a."""
    xs = [x for x in xs if not math.isnan(x)]
    sd = f" ± {np.std(xs, ddof=1):.{digits}f}" if len(xs) > 1 else ""
    return f"{np.mean(xs):.{digits}f}{sd}" if xs else "n/a"


def compare_table(groups) -> str:
    """One line per group: mean ± sd over its seeds of the agent, SFT-start and teacher rows of each run's
    eval.json (a run without one is n/a there, its curves are drawn all the same) and of the final wall-clock."""
    lines = ["| method | seeds | SFT start | success | source | teacher success | return | grounding "
             "| thought entropy | wall-clock (s) |", "|---" * 10 + "|"]
    for label, runs in groups.items():
        evs = [r["eval"] or {} for r in runs]
        cell = lambda row, key="success", digits=3: mean_sd(  # noqa: E731
            [num((ev.get(row) or {}).get(key)) for ev in evs], digits)
        source = {"not evaluated" if ev.get("agent") is None else "held-out"
                  if r["args"].get("eval_split", "eval") == "eval" else "train split" for r, ev in zip(runs, evs)}
        wall = mean_sd([num(r["metrics"][-1].get("charts/wall_time")) for r in runs], 0)
        cells = [label, ",".join(str(r["args"].get("seed", "?")) for r in runs), cell("start (SFT)"), cell("agent"),
                 " + ".join(sorted(source)), cell("teacher"), cell("agent", "return", 2), cell("agent", "grounding"),
                 cell("agent", "thought_entropy"), wall]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve(run, key):
    """(env_steps [K], values [K]) of one metric, nan (null) updates dropped."""
    pts = [(num(r.get("env_steps")), num(r.get(key))) for r in run["metrics"]]
    pts = [(s, v) for s, v in pts if not (math.isnan(s) or math.isnan(v))]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def plot_curves(groups, path):
    """Panels (CURVES, then EVAL_CURVES if logged) against env steps: per group the seed mean, shaded between
    seed min and max, each run interpolated onto the env steps of the group's shortest run (those all reached).
    Written as PNG exactly at `path`, whatever its extension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logged = {k for runs in groups.values() for r in runs for row in r["metrics"] for k in row}
    splits = {r["args"].get("eval_split", "eval") for runs in groups.values() for r in runs}
    split = splits.pop() if len(splits) == 1 else None  # runs of both splits: the titles name neither
    where = {"eval": "held-out ", "train": "training-distribution "}.get(split, "")
    panels = CURVES + tuple((k, where + title) for k, title in EVAL_CURVES if k in logged)
    cols = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 7.5))
    legend = {}  # label -> line, from every panel: a group may have no points in the first one
    for ax, (key, title) in zip(axes.flat, panels):
        for g, (label, runs) in enumerate(groups.items()):
            curves = [c for c in (curve(r, key) for r in runs) if len(c[0])]
            if not curves:
                continue  # e.g. teacher KL of ppo: no teacher, no line
            grid = min((c[0] for c in curves), key=lambda s: s[-1])
            ys = np.stack([np.interp(grid, s, v) for s, v in curves])   # [seeds, K]
            color = plt.get_cmap("tab10").colors[g % 10]
            line, = ax.plot(grid, ys.mean(0), color=color, marker="." if len(grid) < 20 else None)
            legend.setdefault(f"{label} (n={len(curves)})", line)
            if len(curves) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2, linewidth=0)
        if not ax.lines:  # an empty box would read as a plotting bug
            ax.text(0.5, 0.5, f"no data: no run logged a finite {key}", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        ax.set(title=title, xlabel="env steps")
        ax.grid(alpha=0.3)
    # as many legend columns as the longest label lets fit (about 30 characters per panel's width), at most 4
    ncol = max(1, min(4, len(legend), int(cols * 30 // max(map(len, legend), default=1))))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * -(-len(legend) // ncol), 1, 1))  # room below for the legend's rows
    fig.savefig(path, dpi=100, format="png")  # without format, "x.jpg" or "x" would change what is written
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# GIF replays: one frame per turn (the state the agent saw, captioned with its thought and action) plus the
# state the episode ended in (captioned with the outcome). Replay k plays episode k of the level stream.

LEGEND = {"sokoban": (("player", PLAYER), ("box", BOX), ("target", TARGET), ("box on target", BOX_ON_TARGET),
                      ("wall", WALL)),
          "gridworld": (("player", PLAYER), ("goal", GOAL), ("wall", WALL))}
LABEL_LEFT, LABEL_TOP, LEGEND_H = 20, 16, 24  # px: row numbers, column numbers, legend line
GIF_SCALE = 4                                  # env image enlarged 4x (nearest neighbour)


def write_replays(actor, task, n, seed, out_dir, split="eval") -> list[dict]:
    """Play the first `n` episodes of `play`'s level stream one at a time and write out_dir/replay_k.gif for
    each (looping, 0.9 s a frame). Returns [{file, length, success, return, level, frames}]."""
    envs, frames, out = LockstepEnvs(task, 1, seed=seed + EVAL_SEED_OFFSET, split=split), [], []
    bar = tqdm(total=n, desc="replays", unit="ep", leave=False)
    while len(out) < n:
        images, prompts = envs.observe()
        (text,), _, _ = actor(images, prompts, envs, [0])
        before = copy.deepcopy(envs.envs[0])  # the env resets when an episode ends: its end state is replayed here
        step = envs.step_texts([text])
        a = int(step["action"][0])
        action = before.action_names[a] if a >= 0 else "INVALID (turn skipped)"
        caption = f"turn {len(frames) + 1}: {(extract_thought(text) or '').strip()} -> action: {action}"
        # the turn number keeps any two frames apart (Pillow would merge identical ones)
        frames.append((board_frame(before, task), f"{caption} (reward {step['reward'][0]:+.1f})"))
        for e in step["episodes"]:
            before.step(a) if a >= 0 else before.skip_turn()
            outcome = f"{'solved' if e['success'] else 'not solved'} in {e['length']} turns"
            frames.append((board_frame(before, task), f"end: {outcome}, return {e['return']:+.1f}"))
            images = captioned_frames(frames)
            path = os.path.join(out_dir, f"replay_{len(out)}.gif")
            images[0].save(path, save_all=True, append_images=images[1:], duration=900, loop=0)
            out.append({"file": path, "length": e["length"], "success": e["success"], "return": e["return"],
                        "level": e["level"], "frames": len(images)})
            frames = []
            bar.update(1)
    bar.close()
    return out


def board_frame(env, task) -> np.ndarray:
    """[H, W, 3] uint8: the env image enlarged GIF_SCALE times. Grid tasks get 0-based row numbers down the
    left and column numbers along the top (thoughts say "player R,C") and a legend line below: each kind's
    tile as the env draws it, then its name."""
    board = env.render_image(scale=GIF_SCALE)
    if task not in LEGEND:
        return board  # Points24: cards, no grid
    from PIL import Image, ImageDraw
    f, side, ink = font(12), CELL * GIF_SCALE, (0, 0, 0)   # side: px per grid cell in the frame
    widths = [CELL + 14 + int(f.getlength(name)) for name, _ in LEGEND[task]]  # tile, gap, name, gap
    h, w = board.shape[:2]
    img = Image.new("RGB", (max(LABEL_LEFT + w, sum(widths) + 4), LABEL_TOP + h + LEGEND_H), (255, 255, 255))
    img.paste(Image.fromarray(board), (LABEL_LEFT, LABEL_TOP))
    draw = ImageDraw.Draw(img)
    for r in range(env.h):
        draw.text((LABEL_LEFT / 2, LABEL_TOP + (r + 0.5) * side), str(r), fill=ink, font=f, anchor="mm")
    for c in range(env.w):
        draw.text((LABEL_LEFT + (c + 0.5) * side, LABEL_TOP / 2), str(c), fill=ink, font=f, anchor="mm")
    x, y = 4, LABEL_TOP + h + (LEGEND_H - CELL) // 2
    for (name, kind), width in zip(LEGEND[task], widths):
        img.paste(Image.fromarray(draw_grid(np.array([[kind]]))[:CELL, :CELL]), (x, y))  # the tile, unpadded
        draw.text((x + CELL + 4, y + CELL / 2), name, fill=ink, font=f, anchor="lm")
        x += width
    return np.asarray(img)


def captioned_frames(frames, min_width=320, max_lines=12, size=12) -> list:
    """[(frame, caption)] -> PIL images of one size (a GIF needs it): the frame on top (centred), the caption
    below, wrapped at 0.6 * size px a character (Pillow's font: a digit is 0.58 em, most letters less)."""
    from PIL import Image, ImageDraw
    f = font(size)
    width = max(min_width, max(frame.shape[1] for frame, _ in frames))
    frame_h, line_h = max(frame.shape[0] for frame, _ in frames), f.getbbox("Hg")[3] + 3
    wrapped = [textwrap.wrap(caption, int((width - 8) / (0.6 * size))) for _, caption in frames]
    wrapped = [lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines for lines in wrapped]
    images = []
    for (frame, _), lines in zip(frames, wrapped):
        img = Image.new("RGB", (width, frame_h + 8 + line_h * max(map(len, wrapped))), (255, 255, 255))
        img.paste(Image.fromarray(frame), ((width - frame.shape[1]) // 2, 0))
        draw = ImageDraw.Draw(img)
        for k, line in enumerate(lines):
            draw.text((4, frame_h + 4 + k * line_h), line, fill=(0, 0, 0), font=f)
        images.append(img)
    return images


# ----------------------------------------------------------------------------------------------------------
# CLI: `run` and `compare`. Every value passes its flag's type, a setting read from a run's args.json too, so a
# bad one is refused in one line (exit 2) before any model is loaded. train.py parses its flags the same way.


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose error is one line `PROG: error: ...` and exit status 2, with no usage block."""
    source = ""  # " (from FILE)" while defaults read from FILE are parsed: an error names it

    def error(self, message):  # a subcommand's prog ("eval.py run") reports as "eval.py"
        self.exit(2, f"{self.prog.split()[0]}: error: {' '.join(message.splitlines())}{self.source}\n")


def join_negative_numbers(argv) -> list[str]:
    """["--seed", "-1e-5"] -> ["--seed=-1e-5"]: argparse takes "-1e-5" or "-inf" for a flag and would report a
    missing value instead of letting the flag's type name the bad number."""
    out = []
    for a in map(str, argv):
        if out and re.fullmatch(r"--[^=]+", out[-1]) and a.startswith("-"):
            with contextlib.suppress(ValueError):  # float() reads it: a number, the flag's value
                float(a)
                out[-1] += "=" + a
                continue
        out.append(a)
    return out


def checked(typ, ok, rule):
    """argparse type: typ(text), refused as "must be <rule>, got <value>" unless ok(value)."""
    def parse(text):
        if not ok(value := typ(text)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}")
        return value
    parse.__name__ = typ.__name__  # a text typ() refuses: argparse says "invalid int value: 'abc'"
    return parse


at_least = lambda lo: checked(int, lambda v: v >= lo, f">= {lo}")  # noqa: E731
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "> 0 and finite")  # nan fails both comparisons
SAVED = {  # `run` settings whose default is the run's args.json value, else this: name -> (type, default, help)
    "task": (checked(str, TASKS.__contains__, "one of " + ", ".join(sorted(TASKS))), None, "required with --agent"),
    "seed": (at_least(0), 0, "evaluation seed"),
    "temperature": (POSITIVE, 1.0, "sampling temperature"),
    "max_new_tokens": (at_least(1), 64, "answer length cap"),
    "top_k": (at_least(0), 0, "top-k at sampling, 0 = off"),
    "repetition_penalty": (POSITIVE, 1.0, "repetition penalty at sampling"),
    "eval_split": (checked(str, ("eval", "train").__contains__, "eval or train"), None,
                   "eval: held-out levels | train: the training distribution; with --agent the task's own "
                   "(points24 train, else eval)")}


def parser():
    """(the command line, its `run` subparser, whose SAVED defaults a run's args.json may replace)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = checked(str, lambda d: d == "cpu" or bool(re.fullmatch(r"cuda(:\d+)?", d)) and int(d[5:] or 0) < cuda,
                     f"cpu or one of the {cuda} CUDA devices this torch build sees (cuda, cuda:N)")
    p = OneLineParser(prog="eval.py", description="Evaluate a run or an agent directory (run), or compare runs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate a run or an agent directory",
                       description="Agent (and teacher) sampled and greedy, random and expert rows: a table, "
                                   "eval_full.json, GIF replays.")
    r.add_argument("run", nargs="?", help="run directory written by train.py (runs/X): its last checkpoint")
    r.add_argument("--agent", help="evaluate a bare agent directory instead (anything Agent.load accepts)")
    for name, (parse, default, text) in SAVED.items():
        r.add_argument("--" + name.replace("_", "-"), type=parse, default=default, help=f"{text} (default: the run's"
                       + (")" if default is None else f", else {default})"))
    r.add_argument("--episodes", type=at_least(1), default=100, help="episodes per row (default: %(default)s)")
    r.add_argument("--gif", type=at_least(0), default=0, help="write this many GIF replays replay_k.gif")
    r.add_argument("--out", help="where eval_full.json and GIFs go (default: the run dir; cwd with --agent)")
    r.add_argument("--no-teacher", action="store_true", help="skip the teacher rows")
    r.add_argument("--num-envs", type=at_least(1), default=EVAL_BATCH,
                   help="episodes played at once in one batch; lower it if memory is short (default: %(default)s)")
    r.add_argument("--device", type=device, default="cuda" if cuda else "cpu", help="cpu | cuda | cuda:N")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights dtype")
    c = sub.add_parser("compare", help="compare runs: a markdown table and learning curves")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", default="compare.png", help="PNG of the learning curves (its directory must exist)")
    c.add_argument("--table", help="also write the markdown table to this file (its directory must exist)")
    return p, r


def main(argv=None):
    """Command line -> `run` or `compare` (`eval.py runs/X` is `eval.py run runs/X`); a bad input exits 2 with
    one line (SystemExit, also in-process)."""
    argv = join_negative_numbers(sys.argv[1:] if argv is None else argv)
    argv = argv if argv[:1] in (["run"], ["compare"], ["-h"], ["--help"]) else ["run", *argv]
    p, run_parser = parser()
    ns = p.parse_args(argv)
    if ns.command == "compare":
        try:
            print(compare(ns.runs, ns.out, ns.table))
        except (OSError, ValueError) as e:
            p.error(str(e))
        return print(f"wrote {ns.out}" + (f" and {ns.table}" if ns.table else ""), file=sys.stderr)
    agent_dir, teacher_dir, saved = run_inputs(ns, p.error)
    src = os.path.join(ns.run or "", "args.json")
    if saved:  # parsed again with the run's settings as defaults: a flag still wins, each passes its flag's type
        run_parser.set_defaults(**saved)
        run_parser.source = f" (from {src})"
        ns = p.parse_args(argv)
    if ns.task is None:
        p.error(f"--task is required {'with --agent' if ns.agent else f'({src} names none)'}: one of "
                + ", ".join(sorted(TASKS)))
    ns.eval_split = ns.eval_split or TASKS[ns.task].default_eval_split
    run_cli(ns, agent_dir, teacher_dir, p.error)


def run_inputs(ns, error):
    """`run`'s (agent dir, teacher dir or None, {setting: text} of SAVED from the run's args.json). A run's last
    checkpoint is ckpt/, else ckpt.prev/ (alone after a crash while one replaced the other)."""
    if bool(ns.run) == bool(ns.agent):
        error("give a run directory or --agent DIR, not both" if ns.run else
              "give a run directory (python eval.py run runs/X) or --agent DIR --task TASK")
    if ns.agent:
        return ns.agent if os.path.isdir(ns.agent) else error(f"{ns.agent}: no such agent directory"), None, {}
    ckpt = next((c for c in (os.path.join(ns.run, d) for d in ("ckpt", "ckpt.prev"))
                 if os.path.isdir(os.path.join(c, "agent"))), None)
    if ckpt is None:
        error(f"{ns.run}: " + ("no checkpoint (ckpt/agent) in it; has the run finished an update?"
                               if os.path.isdir(ns.run) else "no such run directory"))
    src, teacher = os.path.join(ns.run, "args.json"), os.path.join(ckpt, "teacher")
    try:
        saved = json.loads(Path(src).read_text()) if os.path.isfile(src) else {}
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object of settings")
    except (OSError, ValueError) as e:
        error(f"{src}: unreadable ({e})")
    teacher = teacher if os.path.isdir(teacher) and not ns.no_teacher else None
    return os.path.join(ckpt, "agent"), teacher, {k: str(v) for k, v in saved.items() if k in SAVED}


def run_cli(ns, agent_dir, teacher_dir, error):
    """`eval.py run`: agent (+ teacher) sampled and greedy, random and expert rows -> table, eval_full.json, GIFs."""
    out_dir, task, seed, split = ns.out or ns.run or ".", ns.task, ns.seed, ns.eval_split
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, no permission
        error(f"--out {out_dir}: cannot make that directory ({e.strerror})")
    from agent import Agent, CheckpointError  # here, as transformers takes seconds to load: bad flags answer first
    try:  # a corrupt or missing file, named
        models = {name: Agent.load(path, device=ns.device, dtype=getattr(torch, ns.dtype))
                  for name, path in (("agent", agent_dir), ("teacher", teacher_dir)) if path}
    except (CheckpointError, OSError, ValueError) as e:
        error(str(e).splitlines()[0])
    decoding = {k: getattr(ns, k) for k in ("temperature", "max_new_tokens", "top_k", "repetition_penalty")}
    rows = {}
    for name, model in models.items():
        for greedy in (False, True):
            label = f"{name} ({'greedy' if greedy else f'T={ns.temperature:g}'})"
            rows[label] = evaluate(model, task, ns.episodes, seed=seed, greedy=greedy, num_envs=ns.num_envs,
                                   split=split, desc=f"eval {label}", **decoding)
            print(f"{label}: success {rows[label]['success']:.3f}", file=sys.stderr)
    rows.update(reference_rows(task, ns.episodes, seed, split=split))
    what = "held-out episodes" if split == "eval" else "episodes from the training distribution"
    print(f"{task}, {ns.episodes} {what} (split={split}), seed {seed}\n\n{format_table(rows)}")
    with seeded(seed, ns.device):
        replays = write_replays(agent_actor(models["agent"], **decoding), task, ns.gif, seed, out_dir,
                                split=split) if ns.gif else []
    for r in replays:
        print(f"wrote {r['file']}: {r['length']} turns + final frame, success {r['success']}")
    path = os.path.join(out_dir, "eval_full.json")
    write_json(path, {"meta": {"task": task, "episodes": ns.episodes, "seed": seed,
                               "split": "eval (crc32 % 10 == 0)" if split == "eval" else "train",
                               "agent": agent_dir, "teacher": teacher_dir, **{k: getattr(ns, k) for k in SAVED}},
                      "rows": rows, "replays": replays})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
