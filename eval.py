"""eval.py: how well an agent plays and how it thinks, on held-out levels; run comparison; replays.

What is measured (GTR_TURBO.md section 5 reports success and return; sections 2-4 describe thought
collapse, which the last four numbers make visible):
    success rate, mean return, episode length, format-valid rate, invalid-action rate,
    thought grounding (fraction of stated facts that are true, section 6),
    thought diversity: distinct-2 and self-BLEU-2 over thoughts (low distinct / high self-BLEU = templated),
    mean thought-token entropy (entropy collapse), tokens per answer.

Held-out split: every level (Sokoban/GridWorld layout, Points24 hand) whose crc32 % 10 == 0 is an
evaluation level and never appears in training (env.py, `split`). Evaluation also uses its own seeds.

CLI:
    python eval.py runs/X [--episodes N] [--gif K]      agent + teacher + random + expert rows
    python eval.py compare runs/A runs/B ...           markdown table + learning-curve PNG
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np
import torch

EVAL_SEED_OFFSET = 1_000_000  # evaluation episode seeds never coincide with a training run's seeds


# ----------------------------------------------------------------------------------------------------------
# Thought diversity (own code, word level)


def extract_thought(text: str) -> str:
    """The value of "thoughts" in an answer; for broken JSON, the text before the last "action"."""
    m = re.search(r'"thoughts"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
    if m:
        return m.group(1)
    cut = text.rfind('"action"')
    return text[:cut] if cut >= 0 else text


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts, n=2) -> float:
    """Distinct bigrams / all bigrams over the whole set (Li et al. 2016). 0 if no bigram at all."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu2(hyp, refs) -> float:
    """Sentence BLEU-2 of one word list against several: geometric mean of the clipped 1- and 2-gram
    precisions times the brevity penalty (closest reference length). No smoothing."""
    if not hyp or not refs:
        return 0.0
    logs = []
    for n in (1, 2):
        h = Counter(ngrams(hyp, n))
        if not h:
            return 0.0
        max_ref = Counter()
        for r in refs:
            for g, c in Counter(ngrams(r, n)).items():
                max_ref[g] = max(max_ref[g], c)
        clipped = sum(min(c, max_ref[g]) for g, c in h.items())
        if clipped == 0:
            return 0.0
        logs.append(math.log(clipped / sum(h.values())))
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(sum(logs) / 2)


def self_bleu2(texts, max_texts=200) -> float:
    """Mean BLEU-2 of each thought against all the others (Zhu et al. 2018); 1.0 = all identical."""
    words = [t.split() for t in texts[:max_texts]]
    if len(words) < 2:
        return float("nan")
    return float(np.mean([bleu2(w, words[:i] + words[i + 1:]) for i, w in enumerate(words)]))


# ----------------------------------------------------------------------------------------------------------
# Playing episodes


class AgentActor:
    """Answers with an Agent: sampled at the training temperature, or greedy."""

    def __init__(self, agent, temperature=1.0, greedy=False, max_new_tokens=64):
        self.agent, self.temperature, self.greedy, self.max_new_tokens = agent, temperature, greedy, max_new_tokens

    def __call__(self, images, prompts, envs, rows):
        with torch.no_grad():
            b = self.agent.sample(images, prompts, temperature=self.temperature, do_sample=not self.greedy,
                                  max_new_tokens=self.max_new_tokens, top_k=0, repetition_penalty=1.0)
        return b.texts, b.thought_entropy.float().cpu().numpy(), b.gen_mask.sum(-1).cpu().numpy()


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
            texts.append(json.dumps(answer))
        return texts, np.zeros(len(rows)), np.zeros(len(rows))


class ExpertActor:
    """The privileged solver answer (env.expert_answer)."""

    def __call__(self, images, prompts, envs, rows):
        texts = [envs.envs[i].expert_answer() for i in rows]
        return texts, np.zeros(len(rows)), np.zeros(len(rows))


def play(actor, task, episodes, seed, num_envs=16, env_kwargs=None, record=None):
    """Run exactly `episodes` held-out episodes (env i plays episodes i, i+num_envs, ...; extra episodes of
    an env that has met its quota are not counted, so short episodes are not over-represented).
    Returns (episode dicts, turn dicts). `record`: list to append (frame, caption) of env 0's turns."""
    from env import LockstepEnvs
    num_envs = max(1, min(num_envs, episodes))
    envs = LockstepEnvs(task, num_envs, seed=seed + EVAL_SEED_OFFSET, split="eval", **(env_kwargs or {}))
    quota = np.array([len(range(i, episodes, num_envs)) for i in range(num_envs)])
    done_count = np.zeros(num_envs, dtype=int)
    eps, turns = [], []
    while (done_count < quota).any():
        rows = [i for i in range(num_envs) if done_count[i] < quota[i]]
        images, prompts = envs.observe()
        texts, entropy, ntok = actor([images[i] for i in rows], [prompts[i] for i in rows], envs, rows)
        all_texts = [""] * num_envs
        for j, i in enumerate(rows):
            all_texts[i] = texts[j]
        if record is not None and done_count[0] < quota[0]:
            record.append((envs.envs[0].render_image(scale=4), all_texts[0]))
        out = envs.step_texts(all_texts)
        for j, i in enumerate(rows):
            turns.append({"format_ok": bool(out["format_ok"][i]), "action_valid": bool(out["action_valid"][i]),
                          "grounding": float(out["grounding"][i]), "entropy": float(entropy[j]),
                          "tokens": float(ntok[j]), "thought": extract_thought(texts[j])})
        for e in out["episodes"]:
            i = e["env"]
            if done_count[i] < quota[i]:
                eps.append(e)
                done_count[i] += 1
                if record is not None and i == 0:
                    record.append((envs.envs[0].render_image(scale=4), f"episode end: return {e['return']:.1f}"))
    return eps, turns


def summarize(eps, turns) -> dict:
    g = [t["grounding"] for t in turns if not math.isnan(t["grounding"])]
    thoughts = [t["thought"] for t in turns if t["thought"].strip()]
    return {
        "episodes": len(eps),
        "success": float(np.mean([e["success"] for e in eps])),
        "return": float(np.mean([e["return"] for e in eps])),
        "length": float(np.mean([e["length"] for e in eps])),
        "format_rate": float(np.mean([t["format_ok"] for t in turns])),
        "invalid_rate": 1.0 - float(np.mean([t["action_valid"] for t in turns])),
        "grounding": float(np.mean(g)) if g else float("nan"),
        "distinct2": distinct_n(thoughts, 2),
        "self_bleu2": self_bleu2(thoughts),
        "thought_entropy": float(np.mean([t["entropy"] for t in turns])),
        "tokens": float(np.mean([t["tokens"] for t in turns])),
    }


def evaluate(agent, task, episodes=100, seed=0, temperature=1.0, greedy=False, max_new_tokens=64, env_kwargs=None):
    """Held-out evaluation of an Agent -> the summary dict above."""
    actor = AgentActor(agent, temperature, greedy, max_new_tokens)
    return summarize(*play(actor, task, episodes, seed, env_kwargs=env_kwargs))


COLUMNS = ("success", "return", "length", "format_rate", "invalid_rate", "grounding", "distinct2", "self_bleu2",
           "thought_entropy", "tokens")


def format_table(rows: dict) -> str:
    """{name: summary} -> a markdown table a user can paste."""
    head = "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in COLUMNS) + " |\n"
                          for name, r in rows.items())
