"""train.py: the GTR-Turbo training loop in one file, read top to bottom (docs/method.md sections 2 and 4).

    SFT warm-up on solver demonstrations, cached                         (section 6: the "7B-SFT" start)
    for each update:
        rollout: N envs in lockstep, the agent writes thought + action each turn              (section 1)
        guidance, distill.py: turbo-kl: the teacher's clipped reverse KL on the agent's thoughts   (4.2)
                              gtr, turbo-sft: thought labels into a DAgger buffer           (3, 4.3)
        returns: GAE on env rewards, + format reward, - beta * KL penalty       (sections 2, 4.2)
                 V from a small CNN critic on the image (ours; the paper's value head: --critic head)
        PPO epochs: one ratio per turn from lambda * thought logp + action logp                 (section 2)
                    + CE on the thoughts of one DAgger sample per PPO sample             (gtr, turbo-sft)
        critic: refit on the last few updates' returns, after it valued this rollout
        merge: the weights after each epoch join the TIES history -> the next teacher    (sections 4, 4.1)
        log one metrics row; an atomic checkpoint (--resume continues a killed run exactly)

Methods: ppo (RL4VLM, no teacher), gtr (a privileged corrector in GPT-4o's role), turbo-sft, turbo-kl
(GTR-Turbo, the default), sft (more SFT on fresh solver demos, no RL: the baseline RL must beat).
`torchrun --nproc_per_node K train.py ...` gives each rank num_envs / K envs and its own level stream, averages
gradients with one all-reduce per step and reduces every logged number; rank 0 alone writes files and
evaluates. Left out on purpose: value-function pretraining, vision-tower freezing, DeepSpeed and DDP.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from distill import (dagger_loss, demo_loss, guide_mask, gtr_labels, reverse_kl_loss, solver_envs, teacher_answers,
                     teacher_kl, tokenizer_corpus, turbo_sft_labels)
from env import CELL, FORMAT_VERSION, TASKS, LockstepEnvs
from eval import (LEGACY_ARGS, OneLineParser, compare, evaluate, format_table, join_negative_numbers, json_safe,
                  write_json)
from merge import MergeHistory

# agent.py is imported where it is used: it loads transformers (seconds), and --help must answer at once.
METHODS = ("ppo", "gtr", "turbo-sft", "turbo-kl", "sft")
# The SFT start of each task, what a flag of -1 means. Sokoban's batch of 24 keeps the default command within 15
# minutes on 2 CPU cores; GridWorld and Sokoban learn from a demonstrator that plays a random move at these rates.
# Points24 recalls a formula per hand: 2,400 steps give a start near the paper's (about 30% of deals solved, the
# paper's 7B-SFT 22%); 1,200 gave 6-13%, below which self-improvement has little to reinforce.
TASK_SFT = {"sokoban": dict(sft_steps=1200, sft_batch=24, sft_noise=0.5),
            "gridworld": dict(sft_steps=800, sft_batch=32, sft_noise=0.3),
            "points24": dict(sft_steps=2400, sft_batch=32, sft_noise=0.0)}


# The critic of each task. Sokoban and GridWorld: the image critic explains 0.5-0.8 of the return's variance on
# the next rollout from update 7-9 on (docs/round23_image_critic.md); Points24 is left without one (V = 0), not
# measured.
TASK_CRITIC = {"sokoban": "image", "gridworld": "image", "points24": "head"}


def arg(default, help):
    return field(default=default, metadata={"help": help})


def per_task(name: str) -> str:
    return "-1 = the task's (" + ", ".join(f"{task} {sft[name]:g}" for task, sft in TASK_SFT.items()) + ")"


@dataclass
class Args:
    # --- what to train
    task: str = arg("sokoban", " | ".join(TASKS))
    method: str = arg("turbo-kl", "ppo (RL4VLM) | gtr (privileged corrector) | turbo-sft | turbo-kl (GTR-Turbo) | "
                                  "sft (solver demos, no RL)")
    model: str = arg("small", "tiny (~1M params) | small (~5M) | PATH to a Qwen2.5-VL directory | hub id")
    total_steps: int = arg(10240, "env turns over all envs (paper: 30k Points24, 20k ALFWorld)")
    seed: int = arg(1, "seed of weights, sampling and levels")
    device: str = arg("cpu", "cpu | cuda | cuda:N")
    threads: int = arg(0, "torch CPU threads, 0 = torch's default")
    out: str = arg("", "run directory (default runs/<task>-<method>-<model>-s<seed>)")
    resume: str = arg("", "continue the run in this directory from its last checkpoint, with its saved args")
    lr: float = arg(2e-5, "Adam learning rate, cosine decay to 0 (paper 1e-5 on a LoRA 7B)")
    init: str = arg("", "start RL from this agent directory (no SFT warm-up)")
    eval_episodes: int = arg(100, "episodes of the start and final evaluations, 0 = none")
    # --- budgets and logging
    num_envs: int = arg(32, "envs played in lockstep")
    num_steps: int = arg(16, "turns per env per update (paper: 1024 turns per update)")
    budget_by: str = arg("steps", "steps: stop after --total-steps turns | time: after --budget-seconds")
    budget_seconds: float = arg(0.0, "seconds of training loop for --budget-by time (evaluations excluded)")
    eval_split: str = arg("", "eval: held-out levels | train: fresh training deals (the paper's Points24 protocol); "
                              "default: points24 train, else eval")
    log_episodes: int = arg(64, "success and return are logged over this many most recent episodes")
    curve_every: int = arg(0, "every N updates also score agent and teacher on --curve-episodes episodes, 0 = never")
    curve_episodes: int = arg(50, "episodes of each --curve-every evaluation")
    max_skips: int = arg(10, "stop after this many optimizer steps in a row skipped for a non-finite loss")
    # --- SFT warm-up (tiny and small without --init)
    sft_steps: int = arg(-1, "warm-up steps, " + per_task("sft_steps"))
    sft_batch: int = arg(-1, "warm-up batch size, " + per_task("sft_batch"))
    sft_lr: float = arg(3e-4, "warm-up learning rate, cosine decay after 30 warm-up steps")
    sft_noise: float = arg(-1.0, "share of demo moves made random, thoughts true; " + per_task("sft_noise"))
    carry_moments: bool = arg(False, "start RL's Adam from the warm-up's moments instead of zeros")
    # --- sampling
    temperature: float = arg(1.0, "sampling temperature, log-probs use it too (paper 0.2)")
    top_k: int = arg(0, "top-k filter, 0 = off (paper 5)")
    repetition_penalty: float = arg(1.0, "repetition penalty (paper 1.2)")
    max_new_tokens: int = arg(64, "answer length cap (paper 256)")
    # --- PPO (section 2)
    ppo_epochs: int = arg(1, "passes over each update's turns (paper 4)")
    minibatch: int = arg(32, "PPO minibatch size in turns")
    clip: float = arg(0.1, "PPO ratio clip (paper 0.1)")
    critic: str = arg("", "image: a small CNN on the image and the turns left (ImageCritic) | head: the VLM's value "
                          "head, trained by --vf-coef (paper); default: head under --vf-coef > 0, else " +
                          ", ".join(f"{t} {c}" for t, c in TASK_CRITIC.items()))
    vf_coef: float = arg(0.0, "--critic head: value-loss coefficient (paper 0.5); 0 = no critic: V = 0")
    vf_lr: float = arg(1e-5, "learning rate of the value head (paper: the policy's)")
    vf_clip: float = arg(0.1, "value-loss clip around the rollout's values, 0 = off (paper 0.1)")
    critic_steps: int = arg(100, "--critic image: Adam steps of 256 turns per update")
    critic_updates: int = arg(4, "--critic image: it fits the turns of this many most recent updates")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (paper 0.01 with LoRA on 7B)")
    gamma: float = arg(0.9, "discount (paper 0.9)")
    gae_lambda: float = arg(0.95, "GAE lambda (paper 0.95)")
    thought_coef: float = arg(0.5, "lambda: weight of thought tokens in a turn's log-prob (paper 0.5; ALFWorld 0.2)")
    format_reward: str = arg("", "'valid,invalid' added to a turn's return; default ppo 0,0, gtr 5,0, turbo 3,-2")
    invalid: str = arg("penalty", "invalid answer: penalty (state unchanged) | random (a random legal action)")
    invalid_penalty: float = arg(-1.0, "env reward of an invalid turn under --invalid penalty")
    # --- the teacher (section 4)
    kl_coef: float = arg(1.0, "beta, the reverse-KL penalty coefficient (paper 1)")
    kl_clip: float = arg(10.0, "per-token clip of log pi_agent - log pi_teacher to [0, kl_clip] (paper 10)")
    kl_invalid: float = arg(100.0, "KL penalty of a turn with an invalid format (paper 100; --kl-mode shaping)")
    sft_coef: float = arg(1.0, "gtr, turbo-sft: weight of the CE on DAgger samples (paper 1)")
    teacher_retries: int = arg(3, "turbo-sft: resample an invalid teacher answer up to N times, temperature x1.1")
    merge_every: int = arg(1, "rebuild the teacher every N updates (paper 1)")
    density: float = arg(0.8, "TIES trim density (paper code 0.8)")
    ema_alpha: float = arg(0.5, "--weighting ema: weight of the newest checkpoint (paper 0.5)")
    # --- ablations
    teacher: str = arg("merged", "merged: TIES over the agent's checkpoints | static: the SFT model")
    guide: str = arg("thought", "tokens the teacher guides: thought | thought+action (section 4.4)")
    kl_mode: str = arg("shaping", "turbo-kl: shaping (paper): beta x KL off each turn's return | loss: beta x a "
                                  "per-token k2 KL to the teacher in every PPO step")
    kl_estimator: str = arg("clip", "clip (paper) | k1 | abs | k3 | exact (full vocabulary) | forward")
    merge: str = arg("ties", "merge of the checkpoint history: ties | linear")
    weighting: str = arg("ema", "history weighting: ema (the paper's best) | sma")
    ratio: str = arg("turn", "turn: one ratio per turn (paper) | token: one clipped ratio per token")
    # --- large models
    lora_rank: int = arg(0, "LoRA rank on every linear layer, 0 = full fine-tuning (paper 128)")
    lora_alpha: float = arg(0.0, "LoRA alpha, 0 = 2 x rank (paper 256)")
    bf16: bool = arg(None, "bfloat16 autocast, weights and Adam in fp32 (default: on for CUDA and CPUs with bf16 "
                           "kernels, AVX-512 and newer)")

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = fast_bf16(self.device)
        if not self.eval_split:
            self.eval_split = getattr(TASKS.get(self.task), "default_eval_split", "eval")
        self.format_reward = self.format_reward or {"ppo": "0,0", "gtr": "5,0"}.get(self.method, "3,-2")
        if not self.critic and self.task in TASK_CRITIC:
            self.critic = "head" if self.vf_coef > 0 else TASK_CRITIC[self.task]
        for name, rule in self.problems():
            raise ValueError(f"{flag(name)} {rule}")
        for name, value in TASK_SFT[self.task].items():
            if getattr(self, name) == -1:
                setattr(self, name, value)
        self.format_valid, self.format_invalid = (float(x) for x in self.format_reward.split(","))
        if not self.out:
            name = self.model if self.model in ("tiny", "small") else os.path.basename(self.model.rstrip("/"))
            self.out = os.path.join("runs", f"{self.task}-{self.method}-{name}-s{self.seed}")

    def problems(self):
        """(field, the rule its value breaks) for every bad value."""
        for f in dataclasses.fields(self):  # nan and inf pass every comparison below: reject them first
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                yield f.name, f"must be a finite number, got {getattr(self, f.name)}"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                yield name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
        for names, ok, rule in RANGES:
            for name in names.split():
                if not ok(getattr(self, name)):
                    yield name, f"{rule}, got {getattr(self, name)}"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            yield "device", f"must be cpu, cuda or cuda:N, got {self.device!r}"
        if self.lora_rank > 0 and self.model in ("tiny", "small") and not self.init:
            yield "lora_rank", "is for PATH or hub models; tiny and small train all their weights"
        if self.critic == "image" and self.vf_coef > 0:
            yield "vf_coef", "trains the value head; --critic image has a network of its own (give --vf-coef 0)"
        if self.budget_by == "time" and not self.budget_seconds > 0:
            yield "budget_seconds", "must be positive under --budget-by time"
        try:
            valid, invalid = (float(x) for x in self.format_reward.split(","))
            ok = math.isfinite(valid) and math.isfinite(invalid)
        except ValueError:  # not two numbers
            ok = False
        if not ok:
            yield "format_reward", f"must be two finite numbers 'valid,invalid', got {self.format_reward!r}"


CHOICES = {"task": tuple(TASKS), "method": METHODS, "budget_by": ("steps", "time"), "eval_split": ("eval", "train"),
           "invalid": ("penalty", "random"), "teacher": ("merged", "static"), "guide": ("thought", "thought+action"),
           "kl_mode": ("shaping", "loss"), "kl_estimator": ("clip", "k1", "abs", "k3", "exact", "forward"),
           "merge": ("ties", "linear"), "weighting": ("ema", "sma"), "ratio": ("turn", "token"),
           "critic": ("head", "image")}
RANGES = [("total_steps num_envs num_steps ppo_epochs minibatch max_new_tokens merge_every log_episodes curve_episodes "
           "critic_steps critic_updates lr sft_lr vf_lr temperature clip density kl_clip max_grad_norm repetition_penalty",
           lambda v: v > 0, "must be positive"),
          ("seed threads eval_episodes curve_every teacher_retries max_skips top_k vf_clip vf_coef "
           "sft_coef kl_coef thought_coef kl_invalid budget_seconds lora_rank lora_alpha",
           lambda v: v >= 0, "must be >= 0"),
          ("seed threads", lambda v: v < 2**31, "must be < 2**31"),  # numpy seeds and torch threads are 32-bit
          ("gamma gae_lambda", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
          ("sft_noise", lambda v: 0 <= v <= 1 or v == -1, "must be in [0, 1] (-1 = the task's default)"),
          ("density ema_alpha", lambda v: 0 < v <= 1, "must be in (0, 1]"),
          ("sft_steps", lambda v: v >= -1, "must be >= 0 (-1 = the task's default)"),
          ("sft_batch", lambda v: v > 0 or v == -1, "must be positive (-1 = the task's default)")]
# ----------------------------------------------------------------------------------------------------------
# The small math: schedules, GAE, the PPO losses, returns (section 2) and the shaping terms (sections 1, 4.2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fast_bf16(device: str) -> bool:
    """Whether bf16 autocast speeds this device up: CUDA, or a CPU whose oneDNN has bf16 kernels. On a CPU
    without them (AVX2 only) bf16 matmuls fall back to reference code, many times slower than fp32."""
    if device.startswith("cuda"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(args):
    return torch.autocast("cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=args.bf16)


def sampling(args) -> dict:
    """The sampling settings of Agent.sample, for the agent and for the teacher alike."""
    return dict(temperature=args.temperature, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                max_new_tokens=args.max_new_tokens)


def budget_used(args, stats) -> float:
    """Share of the training budget spent: env turns over all ranks (--budget-by steps), or seconds."""
    if args.budget_by == "time":
        return stats["wall_time"] / args.budget_seconds
    return all_reduce(stats["env_steps"]) / args.total_steps


def scheduled_lr(base: float, args, stats) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * budget_used(args, stats)))  # cosine over the budget


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """GAE on env rewards (section 2). rewards, values, dones: [T, N], dones[t]: the episode ended with turn t
    (no bootstrap across it); last_value: [N], V after turn T-1. -> advantages [T, N]."""
    adv = torch.zeros_like(rewards)
    next_adv, next_value = torch.zeros_like(last_value), last_value
    for t in reversed(range(rewards.shape[0])):  # a loop over turns, not tokens: T is small
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        next_adv = delta + gamma * lam * nonterminal * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv


def sequence_logp(logp, thought_mask, action_mask, thought_coef: float):
    """log pi(a|s) of one turn = lambda * sum(thought logp) + sum(action logp) (section 2). [B, G] -> [B]."""
    return thought_coef * (logp * thought_mask).sum(-1) + (logp * action_mask).sum(-1)


def ppo_loss(new_seq, old_seq, advantages, clip: float):
    """The clipped PPO objective with one ratio per turn (section 2). All inputs [B] -> (loss, approx_kl, clipfrac)."""
    log_ratio = new_seq - old_seq
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return pg_loss, approx_kl, clipfrac


def token_ppo_loss(logp, old_logp, advantages, weights, clip: float):
    """--ratio token: one clipped ratio per token, a weighted token mean. logp, old_logp, weights: [B, G] (lambda on
    thought tokens, 1 on action tokens, 0 on padding); advantages: [B], shared by a turn's tokens."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    adv = advantages[:, None]
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    total = weights.sum().clamp_min(1e-8)
    with torch.no_grad():
        approx_kl = (((ratio - 1) - log_ratio) * weights).sum() / total
        clipfrac = (((ratio - 1).abs() > clip).float() * weights).sum() / total
    return (per_token * weights).sum() / total, approx_kl, clipfrac


def value_loss(new_values, old_values, returns, vf_clip: float = 0.0):
    """0.5 * squared error, clipped around the rollout's values when vf_clip > 0. All [B]."""
    v_loss = (new_values - returns) ** 2
    if vf_clip > 0:
        v_clipped = old_values + (new_values - old_values).clamp(-vf_clip, vf_clip)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss.mean()


def shaping(buf, args):
    """The undiscounted terms of a turn's return, [T, N] each: the format reward and the penalty taken off it
    (turbo-kl: beta x the clipped reverse KL, kl_invalid on a bad format; else 0)."""
    fmt = buf["format_ok"]
    reward = fmt * args.format_valid + (1 - fmt) * args.format_invalid
    penalty = torch.zeros_like(reward)
    if args.method == "turbo-kl" and args.kl_mode == "shaping":
        penalty = args.kl_coef * torch.where(fmt > 0, buf["kl"], torch.full_like(buf["kl"], args.kl_invalid))
    return reward, penalty


def compute_returns(buf, last_value, args):
    """GAE on env rewards, then the shaping terms join the turn's return (sections 2, 4.2).
    Without a critic (--critic head --vf-coef 0) the values are 0: GAE sums the rewards discounted by gamma x lambda.
    -> (returns, advantages normalised over all ranks' turns, GAE's lambda-returns: what --critic image fits), [T, N]
    each."""
    adv = gae(buf["rewards"], buf["values"], buf["dones"], last_value, args.gamma, args.gae_lambda)
    reward, penalty = shaping(buf, args)
    returns = adv + buf["values"] + reward - penalty
    advantages = returns - buf["values"]
    mean, std = global_mean_std(advantages)
    return returns, (advantages - mean) / (std + 1e-8), returns - reward + penalty


# ----------------------------------------------------------------------------------------------------------
# The SFT warm-up on solver demonstrations (section 6), and the agent RL starts from


def sft_step(agent, opt, params, demos, args, sync: bool, noise: float = 0.0):
    """One optimizer step of distill.demo_loss. sync: average the gradients over ranks."""
    with autocast(args):
        loss = demo_loss(agent, demos, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync:
        all_reduce_grads(params, True)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


def sft_warmup(agent, args):
    """--sft-steps of SFT on solver demos, lr warm-up over 30 steps then cosine decay; returns the AdamW
    moments by weight name (for --carry-moments)."""
    demos, steps = solver_envs(args.task, args.sft_batch, args.seed + 7919), args.sft_steps
    named = [(n, p) for n, p in agent.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    bar = tqdm(range(steps), desc="SFT warm-up", dynamic_ncols=True)
    for step in bar:
        progress = min(1.0, (step - 30) / max(1, steps - 30))
        lr = args.sft_lr * (step + 1) / 30 if step < 30 else args.sft_lr * 0.5 * (1 + math.cos(math.pi * progress))
        opt.param_groups[0]["lr"] = lr
        loss = sft_step(agent, opt, params, demos, args, sync=False, noise=args.sft_noise)  # rank 0 alone
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return {n: opt.state[p] for n, p in named if p in opt.state}


def sft_cache_dir(args) -> str:
    """One directory per warm-up, named by every setting that changes the warmed-up agent."""
    noise, bf16 = f"-z{args.sft_noise:g}" if args.sft_noise > 0 else "", "-bf16" if args.bf16 else ""
    return os.path.join("runs", "sft-cache", f"{args.task}-{args.model}-s{args.seed}-n{args.sft_steps}{noise}"
                                             f"-b{args.sft_batch}-lr{args.sft_lr:g}{bf16}-f{FORMAT_VERSION}")


def load_init_agent(path, args):
    """An agent directory or hub id with --lora-rank/--lora-alpha (a saved agent's own LoRA settings win);
    under LoRA and --bf16 the frozen base is held in bf16."""
    from agent import Agent
    dtype = torch.bfloat16 if args.lora_rank > 0 and args.bf16 else torch.float32
    return Agent.load(path, device=args.device, dtype=dtype, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha or None)


def make_agent(args):
    """tiny/small: built in code and SFT-warmed, cached in runs/sft-cache/; a directory or hub id: loaded."""
    from agent import Agent, atomic_write
    if args.init or args.model not in ("tiny", "small"):
        return load_init_agent(args.init or args.model, args)
    cache = sft_cache_dir(args)
    if os.path.isfile(os.path.join(cache, "agent.json")):
        if world()[0] == 0:
            print(f"SFT warm-up: reusing cached agent {cache}")
        return Agent.load(cache, device=args.device)
    seed_everything(args.seed)
    agent = Agent.build(args.model, tokenizer_corpus(args.seed), seed=args.seed, device=args.device)
    t0 = time.time()
    moments = sft_warmup(agent, args)
    print(f"SFT warm-up: {args.sft_steps} steps in {time.time() - t0:.0f}s -> {cache}")
    agent.save(cache)
    atomic_write(os.path.join(cache, "sft_moments.pt"), lambda tmp: torch.save(moments, tmp))
    return agent


def policy_and_value_params(agent):
    """(the policy's trainable weights, the value head's): Agent.parameters() lists them in that order."""
    params, n_head = agent.parameters(), len(list(agent.value_head.parameters()))
    return params[:-n_head], params[-n_head:]


def rl_optimizer(agent, args, new_run: bool = True):
    """Adam over the policy (--lr) and the value head (--vf-lr: a fresh head must learn fast, the policy move
    slowly). A new run under --carry-moments starts each weight from the cached warm-up's moments of that name.
    fused=True here and in the warm-up: one kernel over all weights, the same update up to float rounding."""
    body, head = policy_and_value_params(agent)
    opt = torch.optim.Adam([{"params": body, "base_lr": args.lr},
                            {"params": head, "base_lr": args.vf_lr}], lr=args.lr, eps=1e-5, fused=True)
    path = os.path.join(sft_cache_dir(args), "sft_moments.pt")
    if new_run and args.carry_moments and not args.init and args.model in ("tiny", "small"):
        moments = load_train_state(path, "the warm-up's Adam moments (delete its directory to redo the warm-up)")
        for name, p in agent.model.named_parameters():
            m = moments.get(name)
            if m is not None and p.requires_grad and m["exp_avg"].shape == p.shape:
                opt.state[p] = {k: v.clone().to(p.device) for k, v in m.items()}
    return opt


# ----------------------------------------------------------------------------------------------------------
# --critic image: a critic with features of its own


class ImageCritic(torch.nn.Module):
    """V(s) from the observation image and the share of the episode's turns left, a network apart from the VLM.
    A value head on the policy's features, frozen or shared, memorises one update's turns and does not carry to
    the next (docs/round9_critic.md); this one learns features for value alone, from the turns of the last
    --critic-updates updates. Each CELL-px grid cell is averaged to 4 x 4 pixels and embedded by one convolution
    (Qwen2.5-VL's patch), three 3x3 convolutions relate cells up to three apart, and an MLP reads the grid and
    the turns left: the time limit is part of the state, and a critic that cannot see it must average over it.
    On a grid task (env `symmetric`) every fit batch is flipped and transposed at random: eight times the data
    for a value that the rules leave unchanged (out-of-sample EV 0.66 against 0.47 without, docs/round23)."""

    def __init__(self, obs_shape, seed: int, symmetric: bool = False, width: int = 32):
        super().__init__()
        self.pool, self.symmetric = CELL // 4, symmetric
        with torch.random.fork_rng():  # its own init and batches: training's random numbers stay as without it
            torch.manual_seed(seed)
            conv = [torch.nn.Conv2d(3, width, 4, 4), torch.nn.ReLU()]
            for _ in range(3):
                conv += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()]
            self.conv = torch.nn.Sequential(*conv)
            cells = (obs_shape[0] // CELL) * (obs_shape[1] // CELL)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width * cells + 1, 128), torch.nn.ReLU(),
                                           torch.nn.Linear(128, 1))
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        self.replay, self.seen = [], []  # per update: (inputs, turns_left, targets); this rollout's inputs

    def inputs(self, images):
        """N images [H, W, 3] uint8 -> [N, 3, H / pool, W / pool]: each cell as 4 x 4 mean colours."""
        x = torch.as_tensor(np.stack(images)).to(next(self.parameters()).device)
        return torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).float() / 255, self.pool)

    def forward(self, x, turns_left):
        """x from `inputs`, turns_left [B] in [0, 1] -> V [B]."""
        return self.mlp(torch.cat([self.conv(x).flatten(1), turns_left[:, None]], 1)).squeeze(1)

    @torch.no_grad()
    def value(self, images, envs, record: bool = True):
        """V [N] (cpu) of N envs' current states, given their images (what they show now); record: keep the
        inputs for the next fit."""
        x = self.inputs(images)
        left = torch.tensor([1 - e.steps / e.max_steps for e in envs], dtype=torch.float32, device=x.device)
        if record:
            self.seen.append((x, left))
        return self(x, left).cpu()

    def fit(self, targets, steps: int, keep: int, batch: int = 256):
        """Add the recorded turns with their targets ([T * N], turn-major as recorded) to the replay, keep the last
        `keep` updates, then `steps` Adam steps on the squared error. Under torchrun the gradients are averaged,
        so every rank's critic stays the same."""
        device = next(self.parameters()).device
        x, left = (torch.cat(z) for z in zip(*self.seen))
        self.replay = (self.replay + [(x, left, targets.to(device))])[-keep:]
        self.seen = []
        x, left, targets = (torch.cat(z) for z in zip(*self.replay))
        params = list(self.parameters())
        for _ in range(steps):
            idx = torch.randint(len(targets), (min(batch, len(targets)),), generator=self.gen).to(device)
            xb = x[idx]
            if self.symmetric:  # one of the square's 8 symmetries (a rectangle's 4) for the whole batch
                flip_rows, flip_cols, swap = torch.randint(2, (3,), generator=self.gen).tolist()
                xb = xb.flip(2) if flip_rows else xb
                xb = xb.flip(3) if flip_cols else xb
                xb = xb.transpose(2, 3) if swap and xb.shape[2] == xb.shape[3] else xb
            loss = 0.5 * (self(xb, left[idx]) - targets[idx]).pow(2).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(params, True)
            self.opt.step()

    def state(self) -> dict:
        return {"weights": self.state_dict(), "opt": self.opt.state_dict(), "replay": self.replay,
                "gen": self.gen.get_state()}

    def load(self, state: dict):
        self.load_state_dict(state["weights"])
        self.opt.load_state_dict(state["opt"])
        self.replay, self.seen = state["replay"], []
        self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------------------------------------
# The loop, in run order: rollout with guidance, returns, PPO epochs, log


BUF_KEYS = ("rewards", "dones", "values", "format_ok", "action_valid", "kl", "grounding", "entropy")


def rollout(agent, teacher, envs, args, stats, dagger=None, critic=None):
    """--num-steps turns in this rank's N envs (a finished env starts its next episode at once) -> (a Batch per
    turn, [T, N] tensors of BUF_KEYS, V of the state after the last turn [N]). Guidance happens here, with the
    teacher fixed for the update: turbo-kl scores the agent's tokens; gtr and turbo-sft put (image, prompt,
    label) into the DAgger buffer."""
    N, T = len(envs), args.num_steps
    buf = {k: torch.zeros(T, N) for k in BUF_KEYS}
    batches = []
    for t in range(T):
        images, prompts = envs.observe()
        if critic is not None:
            buf["values"][t] = critic.value(images, envs.envs)
        if args.method == "gtr":  # what the corrector knows of the state the agent is about to act in
            experts, optimal = [e.expert_answer() for e in envs.envs], [e.optimal_actions() for e in envs.envs]
        with torch.no_grad(), autocast(args):
            batch = agent.sample(images, prompts, **sampling(args))
            t0 = time.time()
            if args.method == "turbo-kl":  # section 4.2: the teacher scores the agent's own sampled tokens
                kl = teacher_kl(agent, teacher, batch, guide_mask(batch, args.guide), args.kl_estimator, args.kl_clip)
                buf["kl"][t] = kl.float().cpu()
            elif args.method == "turbo-sft":  # section 4.3: the teacher answers the same observations itself
                guide = teacher_answers(teacher, images, prompts, envs.envs, args.teacher_retries, **sampling(args))
            stats["teacher_time"] += time.time() - t0
        out = envs.step_texts(batch.texts)
        if args.method in ("gtr", "turbo-sft"):
            labels = gtr_labels(experts, optimal, out["action"], out["grounding"], envs.envs) if args.method == "gtr" \
                else turbo_sft_labels(guide, out["action"], envs.envs)
            dagger.extend((images[j], prompts[j], y) for j, y in enumerate(labels) if y is not None)
            stats["labels"] += sum(y is not None for y in labels)
        batches.append(batch.to("cpu"))
        for key, k in (("rewards", "reward"), ("dones", "done"), ("format_ok", "format_ok"),
                       ("action_valid", "action_valid"), ("grounding", "grounding")):
            buf[key][t] = torch.as_tensor(out[k], dtype=torch.float32)
        if args.vf_coef > 0:  # else the image critic's above, or no critic: V = 0 (buf starts at zeros)
            buf["values"][t] = batch.values.float().cpu()
        buf["entropy"][t] = batch.thought_entropy.float().cpu()
        stats["env_steps"] += N
        stats["episodes"].extend(gather(out["episodes"]))  # the same list, same order on every rank
    images, prompts = envs.observe()  # even without a critic: scripts/solver_critic.py values this state
    last = torch.zeros(N)
    if args.vf_coef > 0:
        with torch.no_grad(), autocast(args):  # V(s_T) for the bootstrap; the value reads only the prompt
            last = agent.encode(images, prompts, [""] * N).values.float().cpu()
    elif critic is not None:
        last = critic.value(images, envs.envs, record=False)
    return batches, buf, last


def ppo_data(batches, buf, last_value, args):
    """The PPO buffer: every turn played, flattened turn-major in the order of Batch.cat(batches)."""
    from agent import Batch
    returns, advantages, env_returns = compute_returns(buf, last_value, args)
    return {"batch": Batch.cat(batches), "returns": returns.reshape(-1), "advantages": advantages.reshape(-1),
            "values": buf["values"].reshape(-1), "env_returns": env_returns.reshape(-1)}


LOSS_KEYS = ("losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "losses/sft", "losses/teacher_kl")


def ppo_update(agent, opt, params, data, args, stats, update=0, dagger=None, keep_states=False):
    """--ppo-epochs passes over the buffer (+ the DAgger CE for gtr, turbo-sft) -> (the trainable state after each
    epoch if keep_states: the checkpoints the merge folds in, section 4 step 3; the mean losses). Under torchrun
    each rank takes minibatch / K turns per step: every step sees --minibatch turns."""
    n = data["batch"].values.shape[0]
    size = args.minibatch // world()[1]
    states, logs, zero = [], [], torch.zeros((), device=agent.device)
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, size):
            idx = perm[start:start + size]
            mb = data["batch"].select(idx).to(agent.device)
            with autocast(args):
                logp, values, _ = agent.score(mb)
                sft = dagger_loss(agent, dagger, len(idx), args.guide) if dagger else zero
            logp, values = logp.float(), values.float()
            thought, action = mb.thought_mask.float(), mb.action_mask.float()
            adv = data["advantages"][idx].to(agent.device)
            old_values, returns = data["values"][idx].to(agent.device), data["returns"][idx].to(agent.device)
            if args.ratio == "turn":
                new_seq = sequence_logp(logp, thought, action, args.thought_coef)
                old_seq = sequence_logp(mb.logp.float(), thought, action, args.thought_coef)
                pg, approx_kl, clipfrac = ppo_loss(new_seq, old_seq, adv, args.clip)
            else:
                pg, approx_kl, clipfrac = token_ppo_loss(logp, mb.logp.float(), adv,
                                                         args.thought_coef * thought + action, args.clip)
            vl = value_loss(values, old_values, returns, args.vf_clip)
            kl = zero
            if args.method == "turbo-kl" and args.kl_mode == "loss":
                kl = reverse_kl_loss(logp, mb.teacher_logp, guide_mask(mb, args.guide), args.kl_clip)
            loss = pg + args.vf_coef * vl + args.sft_coef * sft.float() + args.kl_coef * kl
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))  # one sync per minibatch, not per token
            if finite:
                loss.backward()
            finite = all_reduce_grads(params, finite)  # averaged before the clip, so all ranks clip alike
            if finite:
                finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)))
            if not finite:  # skip the step: a NaN or inf never reaches the weights
                opt.zero_grad(set_to_none=True)
                stats["skipped_steps"] += 1
                stats["skips_in_row"] += 1
                if stats["skips_in_row"] >= args.max_skips:
                    raise FloatingPointError(f"update {update}: {stats['skips_in_row']} optimizer steps in a row had a "
                                             "non-finite loss or gradient; stopping (weights are the last finite ones)")
                continue
            stats["skips_in_row"] = 0
            opt.step()
            logs.append(torch.stack([pg.detach(), vl.detach(), approx_kl, clipfrac, sft.detach().float(),
                                     kl.detach().float()]))
        if keep_states:
            states.append(agent.trainable_state())
    means = all_reduce(torch.stack(logs).mean(0), "mean").tolist() if logs else [float("nan")] * len(LOSS_KEYS)
    # the share of the variance of what the critic fits that the rollout's values explained: ~0 means A is little
    # more than G. The values came before this update's fit: the number is out of sample.
    target = data["env_returns"] if args.critic == "image" else data["returns"]
    ev = 1 - global_var(target - data["values"]) / global_var(target).clamp_min(1e-8)
    return states, {**dict(zip(LOSS_KEYS, means)), "losses/explained_variance": ev.item()}


def sft_update(agent, opt, params, demos, args):
    """--method sft: as many optimizer steps as PPO takes per update, each on fresh solver demos."""
    n_steps = args.ppo_epochs * math.ceil(args.num_envs * args.num_steps / args.minibatch)
    losses = [sft_step(agent, opt, params, demos, args, sync=True) for _ in range(n_steps)]
    return {"losses/sft": all_reduce(torch.stack(losses).mean(), "mean").item()}  # the other losses: NaN in the log


def new_stats() -> dict:
    """The loop's running counts, saved in every checkpoint; env_steps and episodes are this rank's."""
    return {"teacher_time": 0.0, "skipped_steps": 0, "skips_in_row": 0, "labels": 0, "episodes": [], "wall_time": 0.0,
            "env_steps": 0}


def log_row(update, args, buf, stats, losses, lr):
    """One metrics.jsonl row, on every rank. buf: all ranks' [T, N] rollout tensors (gather)."""
    fmt, g = buf["format_ok"].reshape(-1), buf["grounding"].reshape(-1)
    g = g[~torch.isnan(g)]
    eps = stats["episodes"][-args.log_episodes:]

    def mean(key):
        return float(np.mean([e[key] for e in eps])) if eps else float("nan")
    return {
        "update": update,
        "env_steps": int(all_reduce(stats["env_steps"])),
        "charts/success_rate": mean("success"),
        "charts/episodic_return": mean("return"),
        "charts/episodic_length": mean("length"),
        "charts/format_rate": fmt.mean().item(),
        "charts/invalid_rate": 1.0 - buf["action_valid"].reshape(-1).mean().item(),
        "charts/thought_grounding": g.mean().item() if g.numel() else float("nan"),
        "charts/thought_entropy": buf["entropy"].reshape(-1).mean().item(),
        "teacher/kl": buf["kl"].reshape(-1)[fmt > 0].mean().item() if args.method == "turbo-kl" and fmt.sum() > 0
        else float("nan"),
        "teacher/labels": int(all_reduce(stats["labels"])),
        **{k: losses.get(k, float("nan")) for k in LOSS_KEYS + ("losses/explained_variance",)},
        "charts/lr": lr,
        "charts/wall_time": stats["wall_time"],
        "teacher/time": stats["teacher_time"],
        "charts/skipped_steps": stats["skipped_steps"],
    }


# ----------------------------------------------------------------------------------------------------------
# main: set up or resume, the loop, the final evaluation


def main(args: Args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    init_distributed(args)
    rank, n_ranks = world()
    main_rank = rank == 0  # the one that writes files, prints, evaluates and shows the bar
    os.makedirs(args.out, exist_ok=True)
    if main_rank:  # a resume rewrites it only with the RESUME_FLAGS it changed
        write_json(os.path.join(args.out, "args.json"),
                   {**dataclasses.asdict(args), "resume": "", "world_size": n_ranks})
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt = find_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None and main_rank:
        print(f"resume: {args.out} has no finished update; starting it from the beginning with its args.json")
    if not ckpt and not main_rank:
        barrier()  # rank 0 runs the SFT warm-up and writes its cache; the other ranks then load that cache
    agent = load_init_agent(os.path.join(ckpt, "agent"), args) if ckpt else make_agent(args)
    if not ckpt and main_rank:
        barrier()
    params = agent.parameters()  # the policy's trainable weights, then the value head's
    if n_ranks > 1:  # rank 0's weights everywhere (a fresh value head or LoRA init draws random numbers)
        for p in params:
            dist.broadcast(p.data, 0)
    seed_everything(args.seed + rank)
    envs = LockstepEnvs(args.task, args.num_envs // n_ranks, seed=args.seed + RANK_STRIDE * rank, split="train",
                        invalid=args.invalid, invalid_penalty=args.invalid_penalty)
    teacher, history = None, None
    if args.method in ("turbo-sft", "turbo-kl"):
        # before any RL the teacher is the SFT model itself; it is frozen, never trained
        teacher = load_init_agent(os.path.join(ckpt, "teacher"), args).copy_frozen() if ckpt else agent.copy_frozen()
        if args.teacher == "merged":  # every rank merges the same states: the teachers stay identical
            history = MergeHistory(agent.trainable_state(), method=args.merge, mode=args.weighting,
                                   alpha=args.ema_alpha, density=args.density)
    critic = None
    if args.critic == "image" and args.method != "sft":
        env = envs.envs[0]
        critic = ImageCritic(env.observation_space.shape, args.seed, env.symmetric).to(args.device)
    dagger = [] if args.method in ("gtr", "turbo-sft") else None  # (image, prompt, target), kept from the start
    demos = None
    if args.method == "sft":  # the baseline continues the warm-up's recipe on levels it has not seen
        params = policy_and_value_params(agent)[0]
        demos = solver_envs(args.task, args.minibatch // n_ranks, args.seed + 104729 + RANK_STRIDE * rank)
        opt = torch.optim.AdamW([{"params": params, "base_lr": args.sft_lr}], lr=args.sft_lr, betas=(0.9, 0.95),
                                weight_decay=0.0, fused=True)
    else:
        opt = rl_optimizer(agent, args, new_run=not ckpt)
    if ckpt:
        stats, dagger, start = resume(ckpt, args, opt, params, history, envs, demos, metrics_path, critic)
    else:
        stats, start = new_stats(), 1
        if main_rank:
            open(metrics_path, "w").close()
            start_evaluation(agent, args)
        seed_everything(args.seed + rank)  # training draws the same numbers with or without the start evaluation

    t_start = time.time() - stats["wall_time"]
    bar = tqdm(desc=f"{args.method} {args.task}", dynamic_ncols=True, initial=int(all_reduce(stats["env_steps"])),
               total=None if args.budget_by == "time" else args.total_steps, unit="turn", disable=not main_rank)
    update = start
    while budget_used(args, stats) < 1.0:
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(g["base_lr"], args, stats)
        lr = opt.param_groups[0]["lr"]
        batches, buf, last_value = rollout(agent, teacher, envs, args, stats, dagger, critic)
        if args.method == "sft":  # the rollout only measures; the weights learn from the solver
            states, losses = [], sft_update(agent, opt, params, demos, args)
        else:
            data = ppo_data(batches, buf, last_value, args)
            states, losses = ppo_update(agent, opt, params, data, args, stats, update, dagger,
                                        keep_states=history is not None)
            if critic is not None:  # after scoring this rollout: its EV above is out of sample
                critic.fit(data["env_returns"], args.critic_steps, args.critic_updates)
        if history is not None:  # section 4 steps 3-4: fold this update's checkpoints in, refresh the teacher
            t0 = time.time()
            history.add(states)
            if update % args.merge_every == 0:
                teacher.load_trainable_state(history.teacher_state())
            stats["teacher_time"] += time.time() - t0
        # the slowest rank's clock: every rank must agree on the lr and on when the time budget ends
        stats["wall_time"] = all_reduce(time.time() - t_start, "max")
        row = log_row(update, args, gather(buf), stats, losses, lr)
        if args.curve_every and update % args.curve_every == 0:  # same levels every time
            t0 = time.time()
            if main_rank:
                row["eval/agent_success"] = held_out(agent, args, args.curve_episodes, "curve agent")["success"]
                if teacher is not None:
                    row["eval/teacher_success"] = held_out(teacher, args, args.curve_episodes,
                                                           "curve teacher")["success"]
            t_start += all_reduce(time.time() - t0, "max")  # evaluations are off the training clock
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        bar.set_postfix(success=f"{row['charts/success_rate']:.2f}", kl=f"{row['teacher/kl']:.3f}",
                        sps=f"{row['env_steps'] / row['charts/wall_time']:.1f}")
        stats["episodes"] = stats["episodes"][-args.log_episodes:]
        save_checkpoint(args, update, agent, teacher, opt, envs, history, stats, dagger, demos, critic)
        bar.update(row["env_steps"] - bar.n)
        update += 1
    bar.close()
    if main_rank:
        final_evaluation(agent, teacher, args)
    if n_ranks > 1:  # every rank waits for rank 0's evaluation, so the group is torn down by all ranks at once
        barrier()
        dist.destroy_process_group()


def held_out(model, args, episodes=None, desc="eval"):
    """--eval-episodes (or `episodes`) episodes of --eval-split levels, sampled as in training. It draws from
    its own seeded generator, so training's random numbers are the same with or without it."""
    with autocast(args):
        return evaluate(model, args.task, episodes or args.eval_episodes, seed=args.seed,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens, split=args.eval_split,
                        desc=desc)


def start_evaluation(agent, args):
    """The RL start (the SFT model), kept in eval_start.json for the final table."""
    if args.eval_episodes > 0:
        row = held_out(agent, args)
        where = "held-out" if args.eval_split == "eval" else "training-distribution"
        print(f"start (SFT) {where} success {row['success']:.3f} over {row['episodes']} episodes")
        write_json(os.path.join(args.out, "eval_start.json"), row)


def final_evaluation(agent, teacher, args):
    """Start, final agent and its teacher on the same episodes -> a table and eval.json; the learning curves ->
    curves.png; then one line saying where the results are."""
    results, curves = os.path.join(args.out, "eval.json"), os.path.join(args.out, "curves.png")
    if args.eval_episodes > 0:
        rows = {}
        if os.path.isfile(os.path.join(args.out, "eval_start.json")):
            with open(os.path.join(args.out, "eval_start.json")) as f:
                rows["start (SFT)"] = json.load(f)  # null where a number was undefined (format_table: n/a)
        rows["agent"] = held_out(agent, args)
        if teacher is not None:
            rows["teacher"] = held_out(teacher, args)
        print(format_table(rows))
        write_json(results, rows)
    compare([args.out], png=curves)
    print((f"results: {results}  " if args.eval_episodes > 0 else "")
          + f"curves: {curves}  metrics: {os.path.join(args.out, 'metrics.jsonl')}")


# ==========================================================================================================
# Plumbing below: the command line, ranks under torchrun, checkpoints. The method is all above.


# ----------------------------------------------------------------------------------------------------------
# The command line: a bad value exits 2 with one line naming the flag


# --help headings, each before the field it names
HEADINGS = {"task": "what to train", "num_envs": "budgets and logging", "sft_steps": "SFT warm-up (tiny and small)",
            "temperature": "sampling", "ppo_epochs": "PPO (section 2)", "kl_coef": "the teacher (section 4)",
            "teacher": "ablations", "lora_rank": "large models (PATH or hub id)"}
# Flags a resumed run may change: they extend or re-evaluate it, or say where it runs, not what it learns.
RESUME_FLAGS = ("total_steps", "budget_seconds", "eval_episodes", "curve_every", "curve_episodes", "threads", "device")
TYPES = {"int": int, "float": float, "str": str}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv=None) -> Args:
    """Command line -> Args; a bad value exits 2 with one line naming the flag. A new run refuses an --out that
    holds one; --resume DIR takes the run's args.json, where only RESUME_FLAGS may change."""
    p = OneLineParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                      usage="%(prog)s [--task T] [--method M] [--model M] [--total-steps N] [--seed S] [flags below]")
    group = p
    for f in dataclasses.fields(Args):
        group = p.add_argument_group(HEADINGS[f.name]) if f.name in HEADINGS else group
        kind = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": TYPES[f.type]}
        default = "" if f.default in ("", None) else " (default: %(default)s)"
        group.add_argument(flag(f.name), default=f.default, help=f.metadata["help"] + default, **kind)
    argv = join_negative_numbers(sys.argv[1:] if argv is None else list(argv))  # `--lr -1` -> `--lr=-1`
    ns = vars(p.parse_args(argv))
    if ns["resume"]:  # a resumed run keeps the settings it was started with
        run_dir = os.path.normpath(ns["resume"])
        saved = read_saved_args(run_dir, p.error)
        given = [a[2:].split("=")[0].removeprefix("no-").replace("-", "_") for a in argv if a.startswith("--")]
        for name in dict.fromkeys(given):  # in command-line order, each once
            if name in ("", "resume"):
                continue
            if name not in RESUME_FLAGS:
                p.error(f"{flag(name)} cannot change in a resumed run (--resume keeps the run's args.json); "
                        f"only {', '.join(map(flag, RESUME_FLAGS))} can")
            if ns[name] != saved.get(name):
                print(f"resume: {flag(name)} {ns[name]} (the run had {saved.get(name)})")
                saved[name] = ns[name]
        ns = {**saved, "resume": run_dir, "out": run_dir}
    try:
        args = Args(**ns)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    k = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; every rank takes an equal share
    for name in ("num_envs", "minibatch"):
        if getattr(args, name) % k:
            p.error(f"{flag(name)} {getattr(args, name)} must be divisible by the {k} torchrun processes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch build ({torch.__version__}) sees no CUDA device")
    positions = model_positions(args.model, p.error, "--model")
    if args.init:
        positions = model_positions(args.init, p.error, "--init", local_only=True)
    if positions is not None and args.max_new_tokens >= positions:
        p.error(f"--max-new-tokens {args.max_new_tokens} does not fit the model's {positions} positions "
                f"(prompt included)")
    if not args.resume:  # the default --out too, made from task, method and seed
        if os.path.isfile(args.out):
            p.error(f"--out {args.out} is a file, not a run directory")
        if any(os.path.exists(os.path.join(args.out, n)) for n in ("args.json", "metrics.jsonl", "ckpt")):
            p.error(f"--out {args.out} already holds a run; continue it with --resume {args.out}, "
                    f"or give a fresh --out")
    return args


def read_json_object(path: str, error) -> dict:
    """agent.read_json, its one line given to `error` (exit 2)."""
    from agent import CheckpointError, read_json
    try:
        return read_json(path)
    except CheckpointError as e:
        error(str(e))


def read_saved_args(run_dir: str, error) -> dict:
    """A run's args.json, each value of its field's type; a damaged file is named in one line."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        error(f"--resume {run_dir}: no args.json there, not a run directory")
    saved = read_json_object(path, error)
    types = {f.name: f.type for f in dataclasses.fields(Args)}
    for k, v in saved.items():  # a float field may hold an int
        if k in types and type(v).__name__ != types[k] and not (types[k] == "float" and type(v) is int):
            error(f"{path} is damaged: {k} = {v!r} is not a {types[k]}")
    missing = [k for k in ("task", "method", "model", "seed", "out") if k not in saved]
    if missing:
        error(f"{path} is damaged: it lacks {', '.join(missing)}")
    # settings added to Args later take their defaults, or what a run saved before them did
    return {**LEGACY_ARGS, **{k: v for k, v in saved.items() if k in types}}


def model_positions(model: str, error, which: str, local_only=False) -> int | None:
    """The positions the model covers (prompt and answer): tiny and small 4096 (agent.build_config), a model
    directory what its config.json says; None for a hub id (its config is not here)."""
    if model in ("tiny", "small") and not local_only:
        return 4096
    if os.path.isfile(model):
        error(f"{which} {model} is a file; give a model directory (with config.json)")
    if not os.path.isdir(model):
        from agent import hub_id
        if local_only or not hub_id(model):
            error(f"{which} {model}: no such model directory")
        return None
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        error(f"{model} is not a model checkpoint: no config.json in it")
    cfg = read_json_object(path, error)
    if "vision_config" not in cfg:
        error(f"{model} is not a vision-language checkpoint (config.json has no vision_config; "
              f"model_type={cfg.get('model_type')!r})")
    try:
        return int(cfg.get("text_config", cfg).get("max_position_embeddings") or cfg["max_position_embeddings"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Ranks under torchrun: every helper is the identity in a one-process run

RANK_STRIDE = 100_003  # rank r plays the level stream of seed + r * RANK_STRIDE (rank 0: the one-process stream)


def world() -> tuple[int, int]:
    """(rank, number of processes)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def init_distributed(args):
    """From torchrun's env vars. CUDA: one GPU per rank, nccl for its tensors, gloo for CPU ones; CPU: gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # a long timeout: the other ranks wait while rank 0 runs the SFT warm-up or the start evaluation
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def barrier():
    if world()[1] > 1:
        dist.barrier()


def all_reduce(x, op: str = "sum"):
    """x, a tensor or a number, summed ("sum"), averaged ("mean") or maxed ("max") over ranks."""
    n = world()[1]
    if n == 1:
        return x
    t = x.clone() if torch.is_tensor(x) else torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t = t / n
    return t if torch.is_tensor(x) else t.item()


def all_reduce_grads(params, finite: bool) -> bool:
    """Average the gradients over ranks in one flat all-reduce, so all ranks clip and step alike. finite: this
    rank's loss was (it ran backward); returns whether every rank's was, so all skip a bad step together."""
    n = world()[1]
    if n == 1:
        return finite
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # no backward: zeros
    ok = torch.tensor([1.0 if finite else 0.0], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [ok])  # [sum(numel) + 1]
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):  # in place: the only extra memory is `flat`
        p.grad = g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(n)
        offset += g.numel()
    return bool(flat[-1] == n)


def global_mean_std(x: torch.Tensor):
    """Mean and unbiased std of x's entries over all ranks, as if one process held them all."""
    if world()[1] == 1:
        return x.mean(), x.std()
    s = torch.stack([x.sum(), torch.tensor(float(x.numel()))]).double()
    dist.all_reduce(s)
    mean = s[0] / s[1]
    sq = ((x.double() - mean) ** 2).sum()  # a second pass: no cancellation in sum(x^2) - n mean^2
    dist.all_reduce(sq)
    return mean.to(x.dtype), (sq / (s[1] - 1)).sqrt().to(x.dtype)


def global_var(x: torch.Tensor):
    """Unbiased variance of x's entries over all ranks, as if one process held them all."""
    return x.var() if world()[1] == 1 else global_mean_std(x)[1] ** 2


def gather(x):
    """Every rank's x, in rank order, on every rank: lists are concatenated, and a dict of rollout tensors [T, N/K]
    becomes [T, N] with rank r's envs in columns r*N/K.. (the one-process order)."""
    n = world()[1]
    if n == 1:
        return x
    parts = [None] * n
    dist.all_gather_object(parts, x)
    if isinstance(x, dict):
        return {k: torch.cat([part[k] for part in parts], 1) for k in x}
    return [item for part in parts for item in part]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: ckpt/ holds everything a killed run needs to continue bit-identically


def save_checkpoint(args, update, agent, teacher, opt, envs, history, stats, dagger, demos=None, critic=None):
    """ckpt.tmp/ is filled (with manifest.json), then ckpt/ -> ckpt.prev/ and ckpt.tmp/ -> ckpt/: a crash leaves
    a complete checkpoint. state.pt: the shared parts and rank 0's own; under torchrun rank r > 0 adds
    state_rank<r>.pt (its envs, RNG streams, stats, DAgger buffer, --critic image with its replay). Call it on
    every rank."""
    from agent import atomic_write, write_manifest
    final, tmp = os.path.join(args.out, "ckpt"), os.path.join(args.out, "ckpt.tmp")
    rank, n = world()
    own = {"update": update, "envs": envs.state_dict(), "stats": stats, "dagger": dagger,
           "demos": demos.state_dict() if demos is not None else None,
           "critic": critic.state() if critic is not None else None,
           "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                   torch.cuda.get_rng_state(args.device) if args.device.startswith("cuda") else None)}

    def write(tmp):
        os.makedirs(tmp)
        barrier()  # ckpt.tmp/ exists before the other ranks write into it
        agent.save(os.path.join(tmp, "agent"))  # the weights are equal on every rank: one copy
        if teacher is not None:
            teacher.save(os.path.join(tmp, "teacher"))
        torch.save({**own, "optimizer": opt.state_dict(), "world_size": n,
                    "history": history.state_dict() if history is not None else None}, os.path.join(tmp, "state.pt"))
        barrier()  # every rank's file is complete before the manifest and the swap
        write_manifest(tmp)  # the SHA-256 of every file, checked by --resume

    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            atomic_write(final, write, tmp=tmp, keep_prev="ckpt.prev")
        else:
            barrier()
            torch.save(own, os.path.join(tmp, f"state_rank{rank}.pt"))
            barrier()
    except OSError as e:  # disk full, permissions: the previous ckpt/ is untouched
        raise OSError(e.errno, f"saving checkpoint of update {update} to {tmp} failed ({e.strerror or e}); "
                               f"the previous checkpoint in {final} is intact") from e


def find_checkpoint(run_dir):
    """ckpt/ if it verifies, else ckpt.prev/ (with a line saying why); None if no update finished."""
    from agent import CheckpointError, verify_manifest
    problems = []
    for path in (os.path.join(run_dir, "ckpt"), os.path.join(run_dir, "ckpt.prev")):
        if not os.path.isdir(path):
            continue
        try:
            if not os.path.isfile(os.path.join(path, "state.pt")):
                raise CheckpointError(f"{path} is incomplete (no state.pt)")
            verify_manifest(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for p in problems:
            print(f"resume: {p}; using {path} instead")
        return path
    if problems:
        raise CheckpointError("; ".join(problems) + " (no other complete checkpoint to fall back to)")
    return None


def load_train_state(path, what: str = ""):
    """A train state (state.pt), or with `what` another dict of tensors; a missing or damaged file is named."""
    from agent import CheckpointError
    try:
        state = torch.load(path, weights_only=bool(what))
    except Exception as e:  # missing, truncated or foreign file: name it, in one line
        raise CheckpointError(f"checkpoint file {path} is missing, corrupt or truncated ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})" + (f"; it holds {what}" if what else "")) from None
    if not isinstance(state, dict) or not (what or "update" in state):
        raise CheckpointError(f"checkpoint file {path} is not a train state of this project")
    return state


def resume(ckpt, args, opt, params, history, envs, demos, metrics_path, critic=None):
    """Optimizer, merge history, envs, demos, the image critic and RNG streams from `ckpt`; metrics rows after it are
    dropped (and a damaged one, with a warning: a full disk cuts the last short). -> (stats, DAgger buffer, next
    update)."""
    from agent import CheckpointError, atomic_write_text
    rank, n_ranks = world()
    state = load_train_state(os.path.join(ckpt, "state.pt"))
    if state.get("world_size", 1) != n_ranks:
        raise CheckpointError(f"{ckpt} was written by {state.get('world_size', 1)} processes; resume it with "
                              f"as many (torchrun --nproc_per_node), not {n_ranks}")
    own = state if rank == 0 else load_train_state(os.path.join(ckpt, f"state_rank{rank}.pt"))
    if own["update"] != state["update"]:
        raise CheckpointError(f"{ckpt}: state_rank{rank}.pt is of update {own['update']}, state.pt of "
                              f"{state['update']}")
    try:  # the optimizer moments and the merge history must fit the agent in ckpt/agent
        opt.load_state_dict(state["optimizer"])
        for p in params:
            for moment in opt.state.get(p, {}).values():
                if torch.is_tensor(moment) and moment.dim() and moment.shape != p.shape:
                    raise ValueError(f"optimizer state of shape {tuple(moment.shape)} for a weight of shape "
                                     f"{tuple(p.shape)}")
        if history is not None:
            history.load_state_dict(state["history"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint file {os.path.join(ckpt, 'state.pt')} does not match the agent in "
                              f"{os.path.join(ckpt, 'agent')} (a different model?): {e}") from None
    envs.load_state_dict(own["envs"])
    if critic is not None:
        critic.load(own["critic"])
    if demos is not None:
        demos.load_state_dict(own["demos"])
    py, np_state, cpu, *cuda = own["rng"]  # cuda: [the GPU's stream, None on a CPU run], or [] (older checkpoints)
    random.setstate(py); np.random.set_state(np_state); torch.set_rng_state(cpu)
    if cuda and cuda[0] is not None and args.device.startswith("cuda"):  # sampling draws from the GPU's stream
        torch.cuda.set_rng_state(cuda[0], args.device)
    if rank == 0:
        kept = []
        with open(metrics_path, "a+") as f:  # a+: an empty file if it is missing
            f.seek(0)
            for i, line in enumerate(f, 1):
                try:
                    if line.strip() and json.loads(line)["update"] <= state["update"]:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    print(f"resume: dropped line {i} of {metrics_path}, it is not a complete metrics row")
        atomic_write_text(metrics_path, "".join(kept))
        print(f"resumed {args.out} after update {state['update']}")
    return own["stats"], own["dagger"], state["update"] + 1


if __name__ == "__main__":
    try:
        main(parse_args())
    except Exception as e:  # the known failures end with one line naming the file or update, no traceback
        from agent import CheckpointError
        if not isinstance(e, (CheckpointError, FloatingPointError, OSError)) or os.environ.get("GTR_DEBUG"):
            raise
        sys.exit(f"error: {e}")
