"""train.py: the GTR-Turbo training loop, one file, read top to bottom (GTR_TURBO.md sections 2 and 4).

    SFT warm-up on solver demonstrations (cached)                       (section 6: the "7B-SFT" start)
    for each update:
        rollout: N envs in lockstep, the agent writes thought + action each turn     (section 1)
        teacher guidance: clipped reverse-KL of the agent's own thought tokens       (section 4.2, turbo-kl)
                          or thought labels into a DAgger buffer                  (sections 3, 4.3: gtr, turbo-sft)
        GAE on env rewards, + format reward, - beta * KL penalty on the turn's return (section 2, 4.2)
        PPO epochs: sequence-level ratio from lambda * thought logp + action logp     (section 2)
                    + CE on thought tokens of one DAgger sample per PPO sample     (gtr, turbo-sft)
        checkpoint after each epoch -> fold into the TIES merge history -> teacher    (section 4, 4.1)
        atomic checkpoint of everything, so --resume continues a killed run exactly

Methods: `ppo` (RL4VLM, no teacher), `gtr` (privileged corrector in GPT-4o's role), `turbo-sft`, `turbo-kl`
(GTR-Turbo, the default), and `sft` (the honest baseline: more SFT on fresh solver demos, no RL). Everything
the paper sets is a flag; where our CPU default differs from the paper's value, the help says so.

Scale-out: `torchrun --nproc_per_node K train.py ...` splits the num_envs envs over K ranks (num_envs / K
each, own level stream and sampling seed per rank), averages gradients with one all-reduce per optimizer step,
normalises advantages with the global mean and std, and reduces every logged metric over all ranks; only
rank 0 writes args.json, metrics.jsonl, checkpoints (each rank adds its own env/RNG state file) and evaluates.
A plain `python train.py` never touches torch.distributed.

Left out on purpose: value-function pretraining, LoRA on the tiny model (full fine-tuning), vision-tower
freezing, DeepSpeed, DDP (one explicit all-reduce is all the loop needs). `python train.py --help` lists
every flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
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

METHODS = ("ppo", "gtr", "turbo-sft", "turbo-kl", "sft")
TASKS = ("sokoban", "gridworld", "points24")


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- what to train
    task: str = arg("sokoban", "environment: sokoban | gridworld | points24")
    method: str = arg("turbo-kl", "ppo (RL4VLM) | gtr (privileged corrector, SFT on thoughts) | turbo-sft | turbo-kl (GTR-Turbo) "
                                  "| sft (baseline: keep training on fresh solver demos, no RL)")
    model: str = arg("small", "tiny (~1M params, tests) | small (~5M, CPU default) | PATH to a Qwen2.5-VL directory | hub id")
    init: str = arg("", "start RL from this agent directory (skips the SFT warm-up)")
    lora_rank: int = arg(0, "PATH/hub models: LoRA rank on every linear layer of LM and vision tower, 0 = full fine-tuning "
                            "(paper 128); the frozen base is then held in bf16 under --bf16")
    lora_alpha: float = arg(0.0, "LoRA alpha, 0 = 2 x rank (paper 256)")
    device: str = arg("cpu", "cpu | cuda | cuda:N")
    threads: int = arg(0, "torch CPU threads (0 = torch's default, all cores)")
    bf16: bool = arg(True, "bfloat16 autocast for forward passes (weights and Adam stay fp32)")
    seed: int = arg(1, "seed of everything: weights, sampling, levels")
    out: str = arg("", "run directory (default runs/<task>-<method>-<model>-s<seed>)")
    # --- budgets
    total_steps: int = arg(10240, "env turns over all envs (paper: 30k on Points24, 20k ALFWorld)")
    num_envs: int = arg(32, "envs run in lockstep (32: batched generation is ~1.4x the turns/s of 16 on 2 cores)")
    budget_by: str = arg("steps", "steps: stop after --total-steps env turns | time: stop after --budget-seconds of training")
    budget_seconds: float = arg(0.0, "wall-clock budget of the training loop (SFT warm-up and evaluations excluded) for --budget-by time")
    num_steps: int = arg(16, "turns per env per update; env turns per update = num_envs * num_steps (paper: 1024)")
    # --- SFT warm-up (tiny/small models without --init)
    sft_steps: int = arg(-1, "warm-up SFT steps; -1 = the task's default (sokoban 600, gridworld 800, points24 1200)")
    sft_batch: int = arg(32, "warm-up SFT batch size")
    sft_lr: float = arg(3e-4, "warm-up SFT learning rate (cosine decay after 30 warm-up steps)")
    sft_noise: float = arg(-1.0, "warm-up demonstrator noise: this share of demo moves is replaced by a random move, the "
                                 "thought's facts kept true (a start that reads the board and chooses noisily: RL can "
                                 "lift it, README 'Acid test'); -1 = the task's default (sokoban and gridworld 0.3, points24 0)")
    # --- sampling (paper: T=0.2, top-k 5, repetition penalty 1.2, 256 new tokens)
    temperature: float = arg(1.0, "sampling temperature; log-probs use it too (paper 0.2: too greedy for a tiny model)")
    top_k: int = arg(0, "top-k filter at sampling, 0 = off (paper 5)")
    repetition_penalty: float = arg(1.0, "(paper 1.2: it punishes the repeated 'row/col' words of grid thoughts)")
    max_new_tokens: int = arg(64, "answer length cap (paper 256)")
    # --- PPO (section 2)
    ratio: str = arg("turn", "turn: one ratio per turn from lambda * thought logp + action logp (the paper) | token: a "
                             "clipped ratio per generated token, loss = token mean weighted lambda on thoughts, 1 on "
                             "actions")
    baseline: str = arg("critic", "critic: GAE with the value head (the paper) | group: group-relative advantages from "
                                  "repeated start states, no critic (episode return vs its group + return-to-go vs the "
                                  "group's turns from the same state, as GiGPO)")
    group_size: int = arg(4, "--baseline group: envs that share each start level (num_envs / group_size levels per "
                             "update, every episode played to its end; --num-steps does not apply)")
    carry_moments: bool = arg(False, "start RL's Adam with the SFT warm-up's moments instead of fresh ones")
    lr: float = arg(2e-5, "Adam learning rate, cosine decay to 0 (paper 1e-5 on a LoRA 7B; 2e-5 here: the oracle acid "
                          "test passes within the default budget, README)")
    ppo_epochs: int = arg(1, "PPO epochs per update (paper 4; 1 here: on 2 cores it triples the env turns per second, "
                             "and 4 epochs learned no more per turn on Sokoban, docs/results_history.md)")
    minibatch: int = arg(32, "PPO minibatch size in turns")
    clip: float = arg(0.1, "PPO ratio clip, also the value clip (paper 0.1)")
    vf_coef: float = arg(0.5, "value-loss coefficient (paper 0.5)")
    vf_lr: float = arg(1e-5, "--baseline critic: learning rate of the value head's own Adam group, cosine-decayed like "
                             "--lr (paper: the same lr as the policy)")
    vf_clip: float = arg(0.1, "--baseline critic: clip range of the value loss in return units, 0 = unclipped (paper "
                              "0.1: on returns of std ~20 it lets V move only 0.1 per update)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (paper 0.01 with LoRA on 7B)")
    gamma: float = arg(0.9, "discount (paper 0.9)")
    gae_lambda: float = arg(0.95, "GAE lambda (paper 0.95)")
    thought_coef: float = arg(0.5, "lambda weighting thought tokens: in the turn's log-prob (--ratio turn) or in the "
                                   "token mean (--ratio token) (paper 0.5 Points24, 0.2 ALFWorld)")
    format_reward: str = arg("", "'valid,invalid' reward added to each turn's return; default ppo 0,0; gtr 5,0; turbo 3,-2 (paper)")
    invalid: str = arg("penalty", "invalid answer: 'penalty' (state unchanged, turn counted) | 'random' (reference code: random legal action)")
    invalid_penalty: float = arg(-1.0, "env reward of an invalid turn under --invalid penalty")
    # --- GTR-Turbo teacher (section 4)
    teacher: str = arg("merged", "turbo methods: merged (TIES over the agent's checkpoint history) | static (the SFT model, ablation)")
    guide: str = arg("thought", "tokens the teacher guides: thought | thought+action (ablation, section 4.4)")
    kl_estimator: str = arg("clip", "clip (paper) | k1 | abs | k3 | exact (full-vocabulary reverse KL) | forward (ablations)")
    sft_coef: float = arg(1.0, "gtr / turbo-sft: weight of the CE on one DAgger sample per PPO sample (paper 1)")
    teacher_retries: int = arg(3, "turbo-sft: resample an invalid teacher answer up to N times, temperature x1.1 each")
    kl_coef: float = arg(1.0, "beta, the reverse-KL penalty coefficient (paper 1)")
    kl_mode: str = arg("shaping", "turbo-kl: shaping (the paper: beta x KL subtracted from the turn's return) | loss "
                                  "(a dense k3 reverse-KL loss to the teacher on the guided tokens, weight "
                                  "--kl-loss-coef, no shaping) | both")
    kl_loss_coef: float = arg(0.1, "--kl-mode loss/both: weight of the per-token KL loss in the PPO objective")
    kl_clip: float = arg(10.0, "per-token clip of log pi_agent - log pi_teacher to [0, kl_clip] (paper 10)")
    kl_invalid: float = arg(100.0, "KL penalty of a turn whose format is invalid (paper 100)")
    merge: str = arg("ties", "merge of the checkpoint history: ties | linear")
    weighting: str = arg("sma", "history weighting: sma | ema")
    ema_alpha: float = arg(0.5, "EMA weight of the newest checkpoint (paper best 0.5)")
    density: float = arg(0.8, "TIES trim density (paper code 0.8)")
    merge_every: int = arg(1, "rebuild the teacher every N updates (paper: 1, up to 10 works)")
    # --- evaluation and output
    resume: str = arg("", "continue the run in this directory from its last complete checkpoint, with its saved args")
    max_skips: int = arg(10, "stop after this many optimizer steps in a row skipped for a non-finite loss or gradient")
    eval_episodes: int = arg(100, "held-out episodes for the final evaluation of agent and teacher (0 = skip)")
    eval_split: str = arg("eval", "levels of the start and final evaluations: eval (held out, never trained on) | "
                                  "train (fresh deals of the training distribution: the paper's Points24 protocol)")
    log_episodes: int = arg(64, "success/return in metrics are over this many most recent training episodes")

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for f in dataclasses.fields(self):  # nan and inf pass every comparison below: reject them first
            if f.type in ("float", float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(self, f.name)}")
        for name in ("total_steps", "num_envs", "num_steps", "sft_batch", "ppo_epochs", "minibatch",
                     "max_new_tokens", "merge_every", "group_size", "log_episodes",
                     "lr", "sft_lr", "vf_lr", "temperature", "clip", "density", "kl_clip", "max_grad_norm",
                     "repetition_penalty"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("seed", "threads", "eval_episodes", "teacher_retries", "max_skips", "top_k", "vf_clip",
                     "vf_coef", "sft_coef", "kl_coef", "thought_coef", "kl_invalid", "budget_seconds", "lora_rank", "lora_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.sft_noise == -1:
            self.sft_noise = {"sokoban": 0.3, "gridworld": 0.3}.get(self.task, 0.0)
        for name, lo_open in (("gamma", False), ("gae_lambda", False), ("sft_noise", False),
                              ("density", True), ("ema_alpha", True)):
            v = getattr(self, name)
            if not (0 < v <= 1 if lo_open else 0 <= v <= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {v}")
        if self.sft_steps < -1:
            raise ValueError(f"--sft-steps must be >= 0 (-1 = the task's default), got {self.sft_steps}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.lora_rank > 0 and self.model in ("tiny", "small") and not self.init:
            raise ValueError("--lora-rank is for PATH or hub models; tiny and small train all their weights")
        if self.budget_by not in ("steps", "time"):
            raise ValueError(f"--budget-by must be steps or time, got {self.budget_by!r}")
        if self.budget_by == "time" and not self.budget_seconds > 0:
            raise ValueError("--budget-by time needs a positive --budget-seconds")
        if self.invalid not in ("penalty", "random"):
            raise ValueError(f"--invalid must be penalty or random, got {self.invalid!r}")
        for name, allowed in (("teacher", ("merged", "static")), ("guide", ("thought", "thought+action")),
                              ("ratio", ("token", "turn")), ("baseline", ("group", "critic")),
                              ("eval_split", ("eval", "train")), ("merge", ("ties", "linear")),
                              ("weighting", ("sma", "ema")),
                              ("kl_estimator", ("clip", "k1", "abs", "k3", "exact", "forward")),
                              ("kl_mode", ("shaping", "loss", "both"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.kl_mode != "shaping" and self.kl_estimator in ("exact", "forward"):
            raise ValueError(f"--kl-mode {self.kl_mode} needs a sampled-token --kl-estimator, not {self.kl_estimator}")
        if self.baseline == "group" and self.num_envs % self.group_size:
            raise ValueError(f"--num-envs {self.num_envs} must be a multiple of --group-size {self.group_size}")
        if self.sft_steps < 0:
            self.sft_steps = {"sokoban": 600, "gridworld": 800, "points24": 1200}[self.task]
        if not self.format_reward:
            self.format_reward = {"ppo": "0,0", "gtr": "5,0"}.get(self.method, "3,-2")
        try:
            valid, invalid = (float(x) for x in self.format_reward.split(","))
        except ValueError:
            raise ValueError(f"--format-reward must be 'valid,invalid', got {self.format_reward!r}") from None
        if not (math.isfinite(valid) and math.isfinite(invalid)):
            raise ValueError(f"--format-reward must be two finite numbers, got {self.format_reward!r}")
        self.format_valid, self.format_invalid = valid, invalid
        if not self.out:
            name = self.model if self.model in ("tiny", "small") else os.path.basename(self.model.rstrip("/"))
            self.out = os.path.join("runs", f"{self.task}-{self.method}-{name}-s{self.seed}")


# Flags a resumed run may change: they extend or re-evaluate it, or say where it runs, not what it learns.
RESUME_FLAGS = ("total_steps", "budget_seconds", "eval_episodes", "threads", "device")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def given_flags(argv: list[str]) -> list[str]:
    """Field names of the flags written on the command line (exact names: the parser takes no abbreviations)."""
    names = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]
    return [n.removeprefix("no-").replace("-", "_") for n in names]


def read_saved_args(run_dir: str, error) -> dict:
    """A run's args.json, every value checked against the field's type; a damaged file is named in one line."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        error(f"--resume {run_dir}: no args.json there, not a run directory")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        error(f"{path} is damaged (not readable JSON: {e}); the run cannot be resumed from it")
    if not isinstance(saved, dict):
        error(f"{path} is damaged (a JSON {type(saved).__name__}, not an object of settings)")
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(Args)}
    fits = {"bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
            "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
            "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)}
    for k, v in saved.items():
        want = types.get(k)
        if not fits.get(want, lambda x: True)(v):
            error(f"{path} is damaged: {k} = {v!r} is not a {want}")
    missing = [k for k in ("task", "method", "model", "seed", "out") if k not in saved]
    if missing:
        error(f"{path} is damaged: it lacks {', '.join(missing)}")
    return {k: v for k, v in saved.items() if k in types}  # settings added to Args later take their defaults


def parse_args(argv=None) -> Args:
    """Dataclass -> argparse; a bad value exits with status 2 and a one-line message. A new run refuses an --out
    that already holds one; --resume DIR takes the run's saved settings, and only RESUME_FLAGS may change them."""
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      allow_abbrev=False)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    from eval import join_negative_numbers  # `--lr -1e-5` -> `--lr=-1e-5`, so the range check names the value
    argv = join_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    ns = p.parse_args(argv)
    if ns.resume:  # a resumed run keeps the settings it was started with
        run_dir = os.path.normpath(ns.resume)
        saved = read_saved_args(run_dir, p.error)
        for name in dict.fromkeys(given_flags(argv)):
            if name == "resume":
                continue
            if name not in RESUME_FLAGS:
                p.error(f"--{name.replace('_', '-')} cannot change in a resumed run (--resume keeps the run's "
                        f"args.json); only {', '.join('--' + n.replace('_', '-') for n in RESUME_FLAGS)} can")
            if getattr(ns, name) != saved.get(name):
                print(f"resume: --{name.replace('_', '-')} {getattr(ns, name)} (the run had {saved.get(name)})")
                saved[name] = getattr(ns, name)
        ns = argparse.Namespace(**saved)
        ns.resume, ns.out = run_dir, run_dir
    try:
        args = Args(**vars(ns))
    except (ValueError, TypeError) as e:
        p.error(str(e))
    k = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; every rank takes an equal share
    for name in ("num_envs", "minibatch"):
        if getattr(args, name) % k:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be divisible by the {k} torchrun processes")
    if args.baseline == "group" and (args.num_envs // k) % args.group_size:
        p.error(f"--group-size {args.group_size} must divide the {args.num_envs // k} envs of each of {k} processes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch build ({torch.__version__}) sees no CUDA device")
    cfg = check_model_arg(args.model, p.error, "--model")
    if args.init:
        cfg = check_model_arg(args.init, p.error, "--init", local_only=True)
    positions = model_positions(args.init or args.model, cfg)
    if positions is not None and args.max_new_tokens >= positions:
        p.error(f"--max-new-tokens {args.max_new_tokens} does not fit the model's {positions} positions "
                f"(prompt included)")
    if not args.resume and os.path.isfile(args.out):  # also the default --out, made from task, method and seed
        p.error(f"--out {args.out} is a file, not a run directory")
    if not args.resume and any(os.path.exists(os.path.join(args.out, n)) for n in ("args.json", "metrics.jsonl", "ckpt")):
        p.error(f"--out {args.out} already holds a run; continue it with --resume {args.out}, or give a fresh --out")
    return args


def model_positions(model: str, cfg: dict | None) -> int | None:
    """Sequence length the model's position embedding covers, from its config.json `cfg` (None for a hub id:
    its config is not here)."""
    if model in ("tiny", "small"):
        return 4096  # agent.build_config
    try:
        return int(cfg.get("text_config", cfg).get("max_position_embeddings") or cfg["max_position_embeddings"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def check_model_arg(model: str, error, flag: str, local_only=False) -> dict | None:
    """tiny/small are built in code; a directory must hold a VLM config (returned); anything else is a hub id."""
    if model in ("tiny", "small") and not local_only:
        return None
    if os.path.isfile(model):
        error(f"{flag} {model} is a file; give a model directory (with config.json)")
    if os.path.isdir(model):
        cfg_path = os.path.join(model, "config.json")
        if not os.path.isfile(cfg_path):
            error(f"{model} is not a model checkpoint: no config.json in it")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            error(f"{cfg_path} is not readable JSON: {e}")
        if "vision_config" not in cfg:
            error(f"{model} is not a vision-language checkpoint (config.json has no vision_config; model_type={cfg.get('model_type')!r})")
        return cfg
    looks_like_path = local_only or model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1] \
        or model.count("/") != 1
    if looks_like_path:
        error(f"{flag} {model}: no such model directory")


# ----------------------------------------------------------------------------------------------------------
# Small helpers beside the loop that uses them


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_stats() -> dict:
    """The loop's running bookkeeping (saved in every checkpoint): seconds in the teacher, NaN-skipped steps,
    DAgger labels made, finished episodes (trimmed to --log-episodes), training-loop seconds, env turns played
    by this rank."""
    return {"teacher_time": 0.0, "skipped_steps": 0, "skips_in_row": 0, "labels": 0, "episodes": [], "wall_time": 0.0,
            "env_steps": 0}


def autocast(args):
    device_type = "cuda" if str(args.device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=args.bf16)


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def budget_used(args, stats) -> float:
    """Share of the training budget spent: env turns over all ranks (--budget-by steps) or seconds."""
    if args.budget_by == "time":
        return stats["wall_time"] / args.budget_seconds
    return all_reduce_float(stats["env_steps"]) / args.total_steps


def scheduled_lr(base: float, args, stats) -> float:
    """Cosine decay of `base` over the share of the budget spent so far (env turns or seconds)."""
    return base * 0.5 * (1 + math.cos(math.pi * budget_used(args, stats)))


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Generalised advantage estimation over a [T, N] rollout (section 2: env rewards only).

    rewards, values, dones: [T, N]; dones[t] = the episode ended with turn t (no bootstrap across it);
    last_value: [N] value of the observation after turn T-1. Returns advantages [T, N].
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(T)):  # a loop over turns, not tokens: T is small
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        next_adv = delta + gamma * lam * nonterminal * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv


def sequence_logp(logp, thought_mask, action_mask, thought_coef: float):
    """log pi(a|s) of one turn = lambda * sum(thought logp) + sum(action logp) (section 2). [B, G] -> [B]."""
    return thought_coef * (logp * thought_mask).sum(-1) + (logp * action_mask).sum(-1)


def ppo_loss(new_seq, old_seq, advantages, new_values, old_values, returns, clip: float, vf_clip: float = 0.0):
    """Clipped PPO objective with one ratio per turn, and the value loss, clipped around the rollout's values
    when vf_clip > 0. All inputs [B]."""
    log_ratio = new_seq - old_seq
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    v_loss = value_loss(new_values, old_values, returns, vf_clip)
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return pg_loss, v_loss, approx_kl, clipfrac


def token_ppo_loss(logp, old_logp, advantages, weights, clip: float):
    """Clipped PPO objective with one ratio per generated token (--ratio token). logp, old_logp, weights:
    [B, G] (weights: lambda on thought tokens, 1 on action tokens, 0 on padding); advantages: [B], one per
    turn, shared by its tokens. Loss = weighted token mean of the clipped surrogate."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    adv = advantages[:, None]
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    total = weights.sum().clamp_min(1e-8)
    pg_loss = (per_token * weights).sum() / total
    with torch.no_grad():
        approx_kl = (((ratio - 1) - log_ratio) * weights).sum() / total
        clipfrac = (((ratio - 1).abs() > clip).float() * weights).sum() / total
    return pg_loss, approx_kl, clipfrac


def value_loss(new_values, old_values, returns, vf_clip: float = 0.0):
    """0.5 * squared error, clipped around the rollout's values when vf_clip > 0. All [B]."""
    v_loss = (new_values - returns) ** 2
    if vf_clip > 0:
        v_clipped = old_values + (new_values - old_values).clamp(-vf_clip, vf_clip)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    return 0.5 * v_loss.mean()


def atomic_write_text(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Agent construction and the SFT warm-up (section 6)


def tokenizer_corpus(seed: int, episodes_per_task: int = 60) -> list[str]:
    """Prompts and expert answers of all three tasks: what the tiny model's BPE vocabulary is trained on."""
    from env import LockstepEnvs
    corpus = []
    for task in TASKS:
        envs = LockstepEnvs(task, 4, seed=seed, split="train", solvable_only=True) if task == "points24" \
            else LockstepEnvs(task, 4, seed=seed, split="train")
        for _ in range(episodes_per_task // 4 * 6):
            _, prompts = envs.observe()
            answers = envs.expert_texts()
            corpus += prompts + answers
            envs.step_texts(answers)
    return corpus


def demo_envs(args, seed, batch=None):
    """Envs driven by the solver: each step yields one fresh (image, prompt, expert answer) per env."""
    from env import LockstepEnvs
    kw = {"solvable_only": True} if args.task == "points24" else {}
    return LockstepEnvs(args.task, batch or args.sft_batch, seed=seed, split="train", **kw)


def sft_step_loss(agent, images, prompts, answers, args):
    """Cross-entropy on the whole answer (thought, action and EOS): the warm-up's loss."""
    batch = agent.encode(images, prompts, answers, temperature=1.0, fill=False)
    logp, _, _ = agent.score(batch, temperature=1.0)
    mask = batch.gen_mask.float()
    return -(logp * mask).sum() / mask.sum()


def sft_step(agent, opt, params, demos, args, sync: bool, noise: float = 0.0):
    """One optimizer step on the next batch of solver demonstrations (a share `noise` of their moves random);
    then the demo envs move on, playing the demonstrated moves. sync: average gradients over torchrun ranks."""
    images, prompts = demos.observe()
    answers = demos.expert_texts(noise)
    with autocast(args):
        loss = sft_step_loss(agent, images, prompts, answers, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync:
        all_reduce_grads(params, True)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    demos.step_texts(answers)
    return loss.detach()


def sft_warmup(agent, args, steps: int, desc="SFT warm-up"):
    """SFT on solver demonstrations (a share --sft-noise of their moves random); returns the AdamW moments by
    parameter name, which the cache keeps for --carry-moments."""
    envs = demo_envs(args, seed=args.seed + 7919)
    named = [(n, p) for n, p in agent.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, args.sft_lr, warmup=30)
        loss = sft_step(agent, opt, params, envs, args, sync=False, noise=args.sft_noise)  # rank 0 alone warms up
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return {n: opt.state[p] for n, p in named if p in opt.state}


def load_warmup_moments(opt, agent, moments: dict) -> int:
    """Copy the warm-up's Adam moments (exp_avg, exp_avg_sq, step) into the RL optimizer's state of the
    same-named weights; returns how many weights got them."""
    count = 0
    for name, p in agent.model.named_parameters():
        m = moments.get(name)
        if m is not None and p.requires_grad and m["exp_avg"].shape == p.shape:
            opt.state[p] = {k: v.clone().to(p.device) for k, v in m.items()}
            count += 1
    return count


def load_agent(path, args):
    """A checkpoint directory or hub id, with --lora-rank/--lora-alpha (a saved agent's own LoRA settings win).
    With LoRA the frozen base is loaded in bf16 under --bf16 (half the memory); LoRA factors, value head and
    Adam stay fp32. Without LoRA every weight is trained, so all stay fp32."""
    from agent import Agent
    dtype = torch.bfloat16 if args.lora_rank > 0 and args.bf16 else torch.float32
    return Agent.load(path, device=args.device, dtype=dtype, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha or None)


def make_agent(args):
    """tiny/small: built in code, SFT-warmed on solver demos, cached; otherwise loaded from a checkpoint."""
    from agent import Agent
    if args.init:
        return load_agent(args.init, args)
    if args.model not in ("tiny", "small"):
        return load_agent(args.model, args)
    cache = sft_cache_dir(args)
    if os.path.isfile(os.path.join(cache, "agent.json")):
        if is_main():
            print(f"SFT warm-up: reusing cached agent {cache}")
        return Agent.load(cache, device=args.device)
    seed_everything(args.seed)
    agent = Agent.build(args.model, tokenizer_corpus(args.seed), seed=args.seed, device=args.device)
    t0 = time.time()
    moments = sft_warmup(agent, args, args.sft_steps)
    print(f"SFT warm-up: {args.sft_steps} steps in {time.time() - t0:.0f}s -> {cache}")
    agent.save(cache)
    tmp = os.path.join(cache, "sft_moments.pt.tmp")
    torch.save(moments, tmp)
    os.replace(tmp, os.path.join(cache, "sft_moments.pt"))
    return agent


def rl_optimizer(agent, args, new_run: bool = True):
    """Adam over the policy (lr) and the value head (its own group: a fresh head must learn fast, the policy
    must move slowly). new_run with --carry-moments: start from the warm-up's moments instead of zeros (a
    resumed run, new_run False, loads its own optimizer state instead)."""
    body, head = [p for p in agent.model.parameters() if p.requires_grad], list(agent.value_head.parameters())
    opt = torch.optim.Adam([{"params": body, "base_lr": args.lr},
                            {"params": head, "base_lr": args.vf_lr}], lr=args.lr, eps=1e-5)
    if new_run and args.carry_moments:
        load_warmup_moments(opt, agent, warmup_moments(args))
    return opt


def sft_cache_dir(args) -> str:
    from env import FORMAT_VERSION
    noise = f"-z{args.sft_noise:g}" if args.sft_noise > 0 else ""
    return os.path.join("runs", "sft-cache",
                        f"{args.task}-{args.model}-s{args.seed}-n{args.sft_steps}{noise}-f{FORMAT_VERSION}")


def warmup_moments(args) -> dict:
    """The cached warm-up's Adam moments ({} for --init, PATH models, or a cache without them)."""
    if args.init or args.model not in ("tiny", "small"):
        return {}
    path = os.path.join(sft_cache_dir(args), "sft_moments.pt")
    return torch.load(path, weights_only=True) if os.path.isfile(path) else {}


# ----------------------------------------------------------------------------------------------------------
# The loop
#
# Several processes (torchrun): each helper below is the identity in a plain single-process run, so that
# run computes exactly what it did before these helpers existed.

RANK_STRIDE = 100_003  # rank r plays the level stream of seed + r * RANK_STRIDE (rank 0: the 1-process stream)


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) unless torchrun started us and init_distributed ran."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_distributed(args):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. CUDA: one GPU per rank (cuda:LOCAL_RANK),
    nccl for CUDA tensors (gradients) and gloo for CPU ones (rollout buffers, episode dicts); CPU: gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = str(args.device).startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # long timeout: the other ranks wait while rank 0 runs the SFT warm-up or the start evaluation
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def barrier():
    if world()[1] > 1:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over ranks (a new tensor; x itself is untouched)."""
    n = world()[1]
    if n == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / n


def all_reduce_float(x: float, op=dist.ReduceOp.SUM) -> float:
    if world()[1] == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_grads(params, finite: bool) -> bool:
    """Average the gradients over ranks (one all-reduce of one flat buffer), so every rank then clips and
    steps identically and the weights stay equal. `finite`: this rank's loss was finite (it ran backward);
    returns whether every rank's was, so that all ranks skip a bad step together."""
    n = world()[1]
    if n == 1:
        return finite
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # no backward: zeros
    flag = torch.tensor([1.0 if finite else 0.0], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [flag])  # [sum(numel) + 1]
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):  # in place: the only extra memory is `flat`
        p.grad = g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(n)
        offset += g.numel()
    return bool(flat[-1] == n)


def global_mean_std(x: torch.Tensor):
    """Mean and (unbiased) std of x's entries over all ranks, as if one process held them all."""
    if world()[1] == 1:
        return x.mean(), x.std()
    s = torch.stack([x.sum(), torch.tensor(float(x.numel()))]).double()
    dist.all_reduce(s)
    mean = s[0] / s[1]
    sq = ((x.double() - mean) ** 2).sum()  # second pass: no cancellation of sum(x^2) - n mean^2
    dist.all_reduce(sq)
    return mean.to(x.dtype), (sq / (s[1] - 1)).sqrt().to(x.dtype)


def gather_envs(buf: dict) -> dict:
    """Rollout tensors [T, N/K] per rank -> [T, N], rank r's envs in columns r*N/K.. (the 1-process order)."""
    n = world()[1]
    if n == 1:
        return buf
    stacked = torch.stack(list(buf.values()))  # [keys, T, N/K]
    parts = [torch.empty_like(stacked) for _ in range(n)]
    dist.all_gather(parts, stacked)
    return dict(zip(buf, torch.cat(parts, 2)))


def gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    n = world()[1]
    if n == 1:
        return items
    out = [None] * n
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def write_rank_checksum(update, agent, teacher):
    """Test hook: with the env var GTR_RANK_CHECKSUMS=DIR every rank appends the SHA-256 of its agent
    (trainable weights + value head) and teacher weights after each update to DIR/rank<r>.jsonl, so a test
    can check that the ranks stay bit-identical. Nothing is written without the variable."""
    out = os.environ.get("GTR_RANK_CHECKSUMS")
    if not out:
        return
    row = {"update": update, "rank": world()[0]}
    for name, model in (("agent", agent), ("teacher", teacher)):
        if model is None:
            continue
        sha = hashlib.sha256()
        tensors = list(model.trainable_state().values()) + list(model.value_head.state_dict().values())
        for t in tensors:
            sha.update(t.detach().float().cpu().numpy().tobytes())
        row[name] = sha.hexdigest()
    with open(os.path.join(out, f"rank{world()[0]}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")



def guide_mask(batch, args):
    """The tokens the teacher guides: thoughts only (section 4.4), or thought + action for the ablation."""
    return batch.gen_mask if args.guide == "thought+action" else batch.thought_mask


def teacher_kl(agent, teacher, batch, args):
    """Turbo-kl (section 4.2): the frozen teacher scores the agent's own sampled tokens, image in context,
    -> per-turn penalty [B]. One teacher forward; the agent's log-probs come from sampling time."""
    from distill import exact_reverse_kl, forward_kl, reverse_kl_penalty
    mask = guide_mask(batch, args)
    if args.kl_estimator in ("exact", "forward"):  # full-vocabulary ablations need both distributions
        _, _, agent_logits = agent.score(batch, return_logits=True)
        _, _, teacher_logits = teacher.score(batch, return_logits=True)
        kl = exact_reverse_kl if args.kl_estimator == "exact" else forward_kl
        return kl(agent_logits, teacher_logits, mask, temperature=batch.temperature)
    teacher_logp, _, _ = teacher.score(batch)
    if args.kl_mode != "shaping":  # the KL loss reads them in PPO: the teacher is fixed for the whole update
        batch.teacher_logp = teacher_logp.float()
    return reverse_kl_penalty(batch.logp, teacher_logp, mask, estimator=args.kl_estimator, lo=0.0, hi=args.kl_clip)


def write_action(answer: str, action: str) -> str:
    """The SFT target keeps the guide's thought but the action the agent executed (sections 3, 4.3);
    those action tokens are masked out of the loss anyway."""
    from env import answer_json
    obj = json.loads(answer)
    obj["action"] = action
    return answer_json(obj)


def gtr_labels(experts, optimal, actions, grounding, envs):
    """GTR's corrector in GPT-4o's role, privileged: a turn whose thought is not fully grounded, or whose
    action is not one of the solver's optimal moves, gets the expert's thought with the agent's own action;
    a correct turn gets no label (None). actions, grounding: [B] of the B envs (a list) that played."""
    labels = []
    for i, env in enumerate(envs):
        a = int(actions[i])
        grounded = grounding[i] == 1.0  # nan (no checkable fact) counts as not grounded
        if grounded and a in optimal[i]:
            labels.append(None)
        else:
            labels.append(write_action(experts[i], env.action_names[a]) if a >= 0 else experts[i])
    return labels


def turbo_sft_labels(guide, actions, envs):
    """Every valid teacher answer becomes a target, with the action the agent executed written in (where
    the agent's own answer was invalid nothing was executed, and the teacher's action stays; masked anyway)."""
    return [g if g is None or actions[i] < 0 else write_action(g, env.action_names[actions[i]])
            for i, (g, env) in enumerate(zip(guide, envs))]


def teacher_answers(teacher, images, prompts, envs, args):  # envs: the list of env objects, one per prompt
    """Turbo-sft (section 4.3): the teacher answers the same image and prompt itself (not conditioned on the
    agent's thought); an invalid answer is resampled at temperature x1.1, up to args.teacher_retries times."""
    from env import parse_answer
    answers, todo, temperature = [None] * len(prompts), list(range(len(prompts))), args.temperature
    for _ in range(1 + args.teacher_retries):
        b = teacher.sample([images[i] for i in todo], [prompts[i] for i in todo], temperature=temperature,
                           top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                           max_new_tokens=args.max_new_tokens)
        still = []
        for text, i in zip(b.texts, todo):
            env = envs[i]
            action, ok = parse_answer(text, env.action_names, env.answer_keys)
            if ok and action is not None:
                answers[i] = text
            else:
                still.append(i)
        todo, temperature = still, temperature * 1.1
        if not todo:
            break
    return answers


def rollout(agent, teacher, envs, args, stats, dagger=None):
    """Play one update's turns in every env of this rank. Returns the per-turn batches (active envs only) and
    [T, N] tensors (N = len(envs): num_envs / K under torchrun), and V of the state after the last turn.
    --baseline critic: args.num_steps turns, finished envs start their next episode at once (the paper).
    --baseline group: every env starts a new episode, neighbours in groups of args.group_size on one level,
    and plays it to its end; an env whose episode ended sits out (buf["active"] 0) until all have ended.
    Finished episodes go to stats["episodes"] from every rank. gtr / turbo-sft append (image, prompt,
    target answer) to this rank's DAgger buffer `dagger`."""
    N, group = len(envs), args.baseline == "group"
    if group:
        envs.reset_groups(args.group_size)
    T = max(env.max_steps for env in envs.envs) if group else args.num_steps
    keys = ("rewards", "dones", "values", "format_ok", "action_valid", "kl", "grounding", "entropy", "active",
            "state_id")
    buf = {k: torch.zeros(T, N) for k in keys}
    state_ids = {}  # (group, state text) -> id: turns from the same state of the same group share a baseline
    active = np.ones(N, bool)
    batches, t = [], 0
    while t < T and active.any():
        idx = np.flatnonzero(active)
        sub = [envs.envs[i] for i in idx]
        all_images, all_prompts = envs.observe()
        images, prompts = [all_images[i] for i in idx], [all_prompts[i] for i in idx]
        if group:
            keys_now = envs.state_keys()
            buf["state_id"][t, idx] = torch.tensor([float(state_ids.setdefault((i // args.group_size, keys_now[i]),
                                                                               len(state_ids))) for i in idx])
        if args.method == "gtr":  # what the corrector knows about the state the agent is about to act in
            experts, optimal = [e.expert_answer() for e in sub], [e.optimal_actions() for e in sub]
        with torch.no_grad(), autocast(args):
            batch = agent.sample(images, prompts, temperature=args.temperature, top_k=args.top_k,
                                 repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
            t0 = time.time()
            if args.method == "turbo-kl":
                buf["kl"][t, idx] = teacher_kl(agent, teacher, batch, args).float().cpu()
            elif args.method == "turbo-sft":
                guide = teacher_answers(teacher, images, prompts, sub, args)
            stats["teacher_time"] += time.time() - t0
        texts = [""] * N
        for j, i in enumerate(idx):
            texts[i] = batch.texts[j]
        out = envs.step_texts(texts, active=active if group else None)
        actions, grounding = out["action"][idx], out["grounding"][idx]
        if args.method == "gtr":
            labels = gtr_labels(experts, optimal, actions, grounding, sub)
        elif args.method == "turbo-sft":
            labels = turbo_sft_labels(guide, actions, sub)
        if args.method in ("gtr", "turbo-sft"):
            dagger.extend((images[j], prompts[j], y) for j, y in enumerate(labels) if y is not None)
            stats["labels"] += sum(y is not None for y in labels)
        batches.append(batch.to("cpu"))
        for key, k in (("rewards", "reward"), ("dones", "done"), ("format_ok", "format_ok"),
                       ("action_valid", "action_valid"), ("grounding", "grounding")):
            buf[key][t, idx] = torch.as_tensor(out[k][idx], dtype=torch.float32)
        buf["values"][t, idx] = batch.values.float().cpu()
        buf["entropy"][t, idx] = batch.thought_entropy.float().cpu()
        buf["active"][t, idx] = 1.0
        stats["env_steps"] += len(idx)
        stats["episodes"].extend(gather_objects(out["episodes"]))  # same list, same order on every rank
        if group:
            active &= ~out["done"]
        t += 1
    buf = {k: v[:t] for k, v in buf.items()}
    if group:  # every episode ended: nothing to bootstrap
        return batches, buf, torch.zeros(N)
    images, prompts = envs.observe()
    with torch.no_grad(), autocast(args):  # V(s_T) for the bootstrap; the value reads only the prompt
        last = agent.encode(images, prompts, [""] * N).values.float().cpu()
    return batches, buf, last


def shaping(buf, args):
    """The per-turn terms that join a turn's return without being discounted (sections 1, 4.2), [T, N] each:
    the format reward, and the penalty subtracted from it: for turbo-kl beta times the clipped reverse-KL
    penalty (kl_invalid on a bad format), otherwise 0."""
    fmt = buf["format_ok"]
    reward = fmt * args.format_valid + (1 - fmt) * args.format_invalid
    penalty = torch.zeros_like(reward)
    if args.method == "turbo-kl" and args.kl_mode != "loss":
        penalty = args.kl_coef * torch.where(fmt > 0, buf["kl"], torch.full_like(buf["kl"], args.kl_invalid))
    return reward, penalty


def compute_returns(buf, last_value, args):
    """--baseline critic (the paper): GAE on env rewards, then the turn's shaping terms join its return.
    Returns (returns, advantages normalised over all ranks' turns), both [T, N]."""
    if args.baseline == "group":
        return group_advantages(buf, args)
    adv = gae(buf["rewards"], buf["values"], buf["dones"], last_value, args.gamma, args.gae_lambda)
    reward, penalty = shaping(buf, args)
    returns = adv + buf["values"] + reward - penalty
    advantages = returns - buf["values"]
    mean, std = global_mean_std(advantages)  # over all ranks' turns: the same scale as one process
    advantages = (advantages - mean) / (std + 1e-8)
    return returns, advantages


def returns_to_go(rewards, active, gamma: float):
    """Discounted return from each turn to the end of its episode, [T, N]; one whole episode per env column
    (group rollouts), inactive turns 0."""
    out = torch.zeros_like(rewards)
    nxt = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):  # a loop over turns, not tokens
        nxt = (rewards[t] + gamma * nxt) * active[t]
        out[t] = nxt
    return out


def group_mean(values, ids, weights):
    """Mean of `values` over entries with the same integer id, read back per entry (weights 0/1 exclude)."""
    ids = ids.long()
    n = int(ids.max()) + 1 if ids.numel() else 0
    sums = torch.zeros(n).index_add_(0, ids, values * weights)
    counts = torch.zeros(n).index_add_(0, ids, weights)
    return sums[ids] / counts[ids].clamp_min(1.0)


def group_advantages(buf, args):
    """Group-relative advantages without a critic, in the manner of GiGPO (verl-agent): the envs of a group
    played the same start level.
        episode level: A_ep = R_i - mean of R over the episode's group            (R: undiscounted env return)
        step level:    A_st = G_t - mean of G over the group's turns from the same state  (G: return-to-go)
        A = A_ep + A_st + (s_t - mean s), s_t the turn's shaping terms; then normalised over all ranks' turns.
    A state visited once gets A_st = 0. Returns (G + s, A), both [T, N]; inactive turns 0."""
    act, rewards = buf["active"], buf["rewards"]
    N = act.shape[1]
    G = returns_to_go(rewards, act, args.gamma)
    R = (rewards * act).sum(0)  # [N]
    groups = torch.arange(N) // args.group_size
    A_ep = R - group_mean(R, groups, torch.ones(N))  # [N]
    A_st = G - group_mean(G.reshape(-1), buf["state_id"].reshape(-1), act.reshape(-1)).view_as(G)
    reward, penalty = shaping(buf, args)
    s = reward - penalty
    s_mean, _ = global_mean_std(s[act > 0])
    advantages = (A_ep[None, :] + A_st + s - s_mean) * act
    mean, std = global_mean_std(advantages[act > 0])
    advantages = (advantages - mean) / (std + 1e-8) * act
    return (G + s) * act, advantages


def ppo_data(batches, buf, last_value, args):
    """The PPO buffer: the active rollout turns flattened turn-major (row t * N + i when all are active),
    in the order of Batch.cat(batches), with returns and advantages."""
    from agent import Batch
    returns, advantages = compute_returns(buf, last_value, args)
    act = buf["active"] > 0
    return {"batch": Batch.cat(batches), "returns": returns[act], "advantages": advantages[act],
            "values": buf["values"][act]}


def teacher_kl_loss(logp, teacher_logp, mask):
    """--kl-mode loss: the k3 estimate of KL(agent || teacher) on the sampled tokens, exp(d) - 1 - d with
    d = log pi_teacher - log pi_agent, a mean over the guided tokens; its gradient (1 - exp(d)) grad log pi_agent
    pulls every guided token toward the teacher at every step (logp, teacher_logp, mask: [B, G])."""
    d = teacher_logp - logp
    return ((torch.expm1(d) - d) * mask).sum() / mask.sum().clamp_min(1.0)


def dagger_loss(agent, dagger, n, args):
    """CE on the guided tokens of n samples drawn uniformly from the whole DAgger buffer (sections 3, 4.3)."""
    from distill import sft_loss
    idx = torch.randint(len(dagger), (n,)).tolist()
    images, prompts, answers = zip(*(dagger[i] for i in idx))
    b = agent.encode(list(images), list(prompts), list(answers), fill=False)
    _, _, logits = agent.score(b, temperature=1.0, return_logits=True)  # [n, G, V]
    return sft_loss(logits, b.gen_ids, guide_mask(b, args))


def ppo_update(agent, opt, params, data, args, stats, update=0, dagger=None, keep_states=False):
    """args.ppo_epochs passes over the buffer (+ the SFT loss for gtr / turbo-sft). Returns the trainable
    state after each epoch when keep_states (section 4, step 3: the checkpoints the merge folds in).
    Under torchrun each rank takes minibatch / K turns of its own buffer per step and the gradients are
    averaged: every step sees args.minibatch turns in all, and there are as many steps as in one process."""
    n = data["batch"].values.shape[0]
    size = args.minibatch // world()[1]
    states, logs = [], []
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, size):
            idx = perm[start:start + size]
            mb = data["batch"].select(idx).to(agent.device)
            with autocast(args):
                logp, values, _ = agent.score(mb)
                sft = dagger_loss(agent, dagger, len(idx), args) if dagger else torch.zeros((), device=agent.device)
            logp, values = logp.float(), values.float()
            thought, action = mb.thought_mask.float(), mb.action_mask.float()
            adv = data["advantages"][idx].to(agent.device)
            old_values, returns = data["values"][idx].to(agent.device), data["returns"][idx].to(agent.device)
            if args.ratio == "turn":
                new_seq = sequence_logp(logp, thought, action, args.thought_coef)
                old_seq = sequence_logp(mb.logp.float(), thought, action, args.thought_coef)
                pg, vl, approx_kl, clipfrac = ppo_loss(new_seq, old_seq, adv, values, old_values, returns,
                                                      args.clip, args.vf_clip)
            else:
                pg, approx_kl, clipfrac = token_ppo_loss(logp, mb.logp.float(), adv,
                                                         args.thought_coef * thought + action, args.clip)
                vl = value_loss(values, old_values, returns, args.vf_clip)
            vf_coef = args.vf_coef if args.baseline == "critic" else 0.0  # group: no critic to fit
            loss = pg + vf_coef * vl + args.sft_coef * sft.float()
            kl = torch.zeros((), device=agent.device)
            if mb.teacher_logp is not None and args.kl_mode != "shaping":
                kl = teacher_kl_loss(logp, mb.teacher_logp.float(), guide_mask(mb, args))
                loss = loss + args.kl_loss_coef * kl
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
            logs.append(torch.stack([pg.detach(), vl.detach(), approx_kl, clipfrac, sft.detach().float(), kl.detach()]))
        if keep_states:
            states.append(agent.trainable_state())
    means = all_reduce_mean(torch.stack(logs).mean(0)).tolist() if logs else [float("nan")] * len(LOSS_KEYS)
    # how much of the returns' variance the rollout-time values explained: ~0 means A is little more than G
    ev = 1 - (data["returns"] - data["values"]).var() / data["returns"].var().clamp_min(1e-8)
    if args.baseline == "group":  # no critic is trained: no value loss, nothing to explain
        means[1], ev = float("nan"), torch.tensor(float("nan"))
    return states, {**dict(zip(LOSS_KEYS, means)), "losses/explained_variance": all_reduce_mean(ev).item()}


LOSS_KEYS = ("losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "losses/sft", "losses/teacher_kl")


def sft_update(agent, opt, params, demos, args, stats):
    """The SFT-alone baseline's "update": as many optimizer steps as PPO takes per update
    (epochs x minibatches), each on a fresh batch of solver demonstrations from new training levels
    (under torchrun each rank's demos are minibatch / K of them, from its own levels)."""
    n_steps = args.ppo_epochs * math.ceil(args.num_envs * args.num_steps / args.minibatch)
    losses = []
    for _ in range(n_steps):
        losses.append(sft_step(agent, opt, params, demos, args, sync=True))
    return {"losses/sft": all_reduce_mean(torch.stack(losses).mean()).item()}  # no policy or value loss: NaN in the log


def summarize(update, args, buf, stats, losses, lr):
    """One metrics row. buf: the [T, N] rollout tensors of all ranks (gather_envs); episodes are already
    every rank's; call it on every rank (the label count is summed over ranks)."""
    act = buf["active"] > 0  # the turns played (group rollouts leave finished envs idle)
    fmt = buf["format_ok"][act]
    g = buf["grounding"][act]
    g = g[~torch.isnan(g)]
    eps = stats["episodes"][-args.log_episodes:]
    row = {
        "update": update,
        "env_steps": int(all_reduce_float(stats["env_steps"])),
        "charts/success_rate": float(np.mean([e["success"] for e in eps])) if eps else float("nan"),
        "charts/episodic_return": float(np.mean([e["return"] for e in eps])) if eps else float("nan"),
        "charts/episodic_length": float(np.mean([e["length"] for e in eps])) if eps else float("nan"),
        "charts/format_rate": fmt.mean().item(),
        "charts/invalid_rate": 1.0 - buf["action_valid"][act].mean().item(),
        "charts/thought_grounding": g.mean().item() if g.numel() else float("nan"),
        "charts/thought_entropy": buf["entropy"][act].mean().item(),
        "teacher/kl": buf["kl"][act][fmt > 0].mean().item() if args.method == "turbo-kl" and fmt.sum() > 0
        else float("nan"),
        "teacher/labels": int(all_reduce_float(stats["labels"])),
        **{k: losses.get(k, float("nan")) for k in LOSS_KEYS + ("losses/explained_variance",)},
        "charts/lr": lr,
        "charts/wall_time": stats["wall_time"],
        "teacher/time": stats["teacher_time"],
        "charts/skipped_steps": stats["skipped_steps"],
    }
    return row


def save_checkpoint(args, update, agent, teacher, opt, envs, history, stats, dagger, demos=None):
    """Everything a killed run needs to continue bit-identically. ckpt.tmp/ is filled (with manifest.json, the
    SHA-256 of every file), then the current ckpt/ becomes ckpt.prev/ and ckpt.tmp/ becomes ckpt/: a crash at
    any point leaves a complete checkpoint, and a damaged ckpt/ is never the only one. state.pt holds the shared
    parts (optimizer, merge history) and rank 0's own; under torchrun rank r > 0 adds state_rank<r>.pt with its
    own envs, RNG streams, stats and DAgger buffer. Call it on every rank."""
    final, tmp, prev = (os.path.join(args.out, d) for d in ("ckpt", "ckpt.tmp", "ckpt.prev"))
    rank, n = world()
    own = {"update": update, "envs": envs.state_dict(), "stats": stats, "dagger": dagger,
           "demos": demos.state_dict() if demos is not None else None,
           "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state())}
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()  # ckpt.tmp/ exists before any rank writes into it
        if rank == 0:
            agent.save(os.path.join(tmp, "agent"))  # weights are equal on every rank: one copy
            if teacher is not None:
                teacher.save(os.path.join(tmp, "teacher"))
            state = {**own, "optimizer": opt.state_dict(), "world_size": n,
                     "history": history.state_dict() if history is not None else None}
            torch.save(state, os.path.join(tmp, "state.pt"))
        else:
            torch.save(own, os.path.join(tmp, f"state_rank{rank}.pt"))
        barrier()  # every rank's file is complete before the manifest and the swap
        if rank == 0:
            write_manifest(tmp)
    except OSError as e:  # disk full, permissions: the previous ckpt/ is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"saving checkpoint of update {update} to {tmp} failed ({e.strerror or e}); "
                               f"the previous checkpoint in {final} is intact") from e
    if rank > 0:
        return
    if os.path.isdir(final):
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)


def write_manifest(ckpt: str):
    """manifest.json: the SHA-256 of every file under ckpt/, so a damaged file is named at resume. Weights of
    an agent directory are not hashed again: Agent.save's own manifest.json there already holds theirs."""
    from agent import sha256_file
    known = {}
    for d, _, fs in os.walk(ckpt):
        if "manifest.json" in fs:
            with open(os.path.join(d, "manifest.json")) as f:
                known.update({os.path.relpath(os.path.join(d, n), ckpt): h for n, h in json.load(f).items()})
    files = sorted(os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs)
    atomic_write_text(os.path.join(ckpt, "manifest.json"), json.dumps(
        {f: known.get(f) or sha256_file(os.path.join(ckpt, f)) for f in files}, indent=1))


def verify_checkpoint(ckpt: str):
    """Every file its manifest lists is there with the same SHA-256 (a checkpoint without a manifest passes)."""
    from agent import CheckpointError, sha256_file
    path = os.path.join(ckpt, "manifest.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None
    for name, digest in manifest.items():
        file = os.path.join(ckpt, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (listed in {path})")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one saved in {path}")


def find_checkpoint(run_dir):
    """The newest checkpoint of a run that verifies: ckpt/, else ckpt.prev/ (with a line saying why), else
    ckpt.old/ (written by older versions). None if the run never finished an update."""
    from agent import CheckpointError
    problems = []
    for d in ("ckpt", "ckpt.prev", "ckpt.old"):
        path = os.path.join(run_dir, d)
        if not os.path.isdir(path):
            continue
        try:
            if not os.path.isfile(os.path.join(path, "state.pt")):
                raise CheckpointError(f"{path} is incomplete (no state.pt)")
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for p in problems:
            print(f"resume: {p}; using {path} instead")
        return path
    if problems:
        raise CheckpointError("; ".join(problems) + " (no other complete checkpoint to fall back to)")
    return None


def load_state(path):
    from agent import CheckpointError
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # truncated or foreign file: name it
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "update" not in state:
        raise CheckpointError(f"checkpoint file {path} is not a train state of this project")
    return state


def read_metrics(path: str, before: int) -> list[str]:
    """metrics.jsonl lines of updates < `before`; a damaged line (a full disk cuts the last one short) is
    dropped with a warning, so a resume redoes that update."""
    kept = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row["update"] < before:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                print(f"resume: dropped line {i} of {path}, it is not a complete metrics row")
    return kept


def main(args: Args):
    from agent import CheckpointError
    from env import LockstepEnvs
    from eval import json_safe
    from merge import MergeHistory

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    init_distributed(args)
    rank, n_ranks = world()
    main_rank = rank == 0  # the one that writes files, prints, evaluates and shows the bar
    os.makedirs(args.out, exist_ok=True)
    if main_rank:  # a resume rewrites it only with the RESUME_FLAGS it changed
        atomic_write_text(os.path.join(args.out, "args.json"),
                          json.dumps({**dataclasses.asdict(args), "resume": "", "world_size": n_ranks}, indent=2))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt = find_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None and main_rank:
        print(f"resume: {args.out} has no finished update; starting it from the beginning with its args.json")
    if ckpt:
        agent = load_agent(os.path.join(ckpt, "agent"), args)
    else:  # rank 0 runs the SFT warm-up and writes its cache; the other ranks then load that cache
        if not main_rank:
            barrier()
        agent = make_agent(args)
        if main_rank:
            barrier()
    body, head = [p for p in agent.model.parameters() if p.requires_grad], list(agent.value_head.parameters())
    params = body + head
    if n_ranks > 1:  # rank 0's weights everywhere (a fresh value head or LoRA init draws random numbers)
        for p in params:
            dist.broadcast(p.data, 0)
    seed_everything(args.seed + rank)
    envs = LockstepEnvs(args.task, args.num_envs // n_ranks, seed=args.seed + RANK_STRIDE * rank, split="train",
                        invalid=args.invalid, invalid_penalty=args.invalid_penalty)

    teacher, history = None, None
    if args.method in ("turbo-sft", "turbo-kl"):
        # before any RL the teacher is the SFT model itself; it is frozen, never trained
        teacher = load_agent(os.path.join(ckpt, "teacher"), args).copy_frozen() if ckpt else agent.copy_frozen()
        if args.teacher == "merged":  # every rank merges the same states: the teachers stay identical
            history = MergeHistory(agent.trainable_state(), method=args.merge, mode=args.weighting,
                                   alpha=args.ema_alpha, density=args.density)
    dagger = [] if args.method in ("gtr", "turbo-sft") else None  # (image, prompt, target), kept from the start

    demos = None
    if args.method == "sft":  # the baseline continues the warm-up's recipe on levels it has not seen
        params = body
        demos = demo_envs(args, seed=args.seed + 104729 + RANK_STRIDE * rank, batch=args.minibatch // n_ranks)
        opt = torch.optim.AdamW([{"params": params, "base_lr": args.sft_lr}], lr=args.sft_lr, betas=(0.9, 0.95),
                                weight_decay=0.0)
    else:
        opt = rl_optimizer(agent, args, new_run=not ckpt)
    stats = new_stats()
    start = 1
    if ckpt:
        state = load_state(os.path.join(ckpt, "state.pt"))
        if state.get("world_size", 1) != n_ranks:
            raise CheckpointError(f"{ckpt} was written by {state.get('world_size', 1)} processes; resume it with "
                                  f"as many (torchrun --nproc_per_node), not {n_ranks}")
        own = state if main_rank else load_state(os.path.join(ckpt, f"state_rank{rank}.pt"))
        if own["update"] != state["update"]:
            raise CheckpointError(f"{ckpt}: state_rank{rank}.pt is of update {own['update']}, state.pt of {state['update']}")
        try:  # the optimizer moments and the merge history must fit the agent in ckpt/agent
            opt.load_state_dict(state["optimizer"])
            for p in params:
                for moment in opt.state.get(p, {}).values():
                    if torch.is_tensor(moment) and moment.dim() and moment.shape != p.shape:
                        raise ValueError(f"optimizer state of shape {tuple(moment.shape)} for a weight of shape {tuple(p.shape)}")
            if history is not None:
                history.load_state_dict(state["history"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint file {os.path.join(ckpt, 'state.pt')} does not match the agent in "
                                  f"{os.path.join(ckpt, 'agent')} (a different model?): {e}") from None
        envs.load_state_dict(own["envs"])
        if demos is not None:
            demos.load_state_dict(own["demos"])
        stats, dagger = own["stats"], own["dagger"]
        stats.setdefault("env_steps", state["update"] * len(envs) * args.num_steps)  # a checkpoint from before it counted
        random.setstate(own["rng"][0]); np.random.set_state(own["rng"][1]); torch.set_rng_state(own["rng"][2])
        start = state["update"] + 1
        if main_rank:
            # lines written after the checkpoint are redone
            kept = read_metrics(metrics_path, start) if os.path.isfile(metrics_path) else []
            atomic_write_text(metrics_path, "".join(kept))
            print(f"resumed {args.out} after update {start - 1}")
    else:
        if main_rank:
            open(metrics_path, "w").close()
            start_evaluation(agent, args)
        seed_everything(args.seed + rank)  # training draws the same numbers with or without the start evaluation

    t_start = time.time() - stats["wall_time"]
    by_time = args.budget_by == "time"  # the bar counts env turns over all ranks
    bar = tqdm(desc=f"{args.method} {args.task}", dynamic_ncols=True, initial=int(all_reduce_float(stats["env_steps"])),
               total=None if by_time else args.total_steps, unit="turn", disable=not main_rank)
    update = start
    while budget_used(args, stats) < 1.0:
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(g["base_lr"], args, stats)
        lr = opt.param_groups[0]["lr"]
        batches, buf, last_value = rollout(agent, teacher, envs, args, stats, dagger)
        if args.method == "sft":  # the rollout only measures; the weights learn from the solver
            states, losses = [], sft_update(agent, opt, params, demos, args, stats)
        else:
            states, losses = ppo_update(agent, opt, params, ppo_data(batches, buf, last_value, args), args, stats,
                                        update, dagger, keep_states=history is not None)
        if history is not None:  # section 4 steps 3-4: fold this update's checkpoints in, refresh the teacher
            t0 = time.time()
            history.add(states)
            if update % args.merge_every == 0:
                teacher.load_trainable_state(history.teacher_state())
            stats["teacher_time"] += time.time() - t0
        # the slowest rank's clock: every rank must agree on the lr and on when the time budget ends
        stats["wall_time"] = all_reduce_float(time.time() - t_start, dist.ReduceOp.MAX)
        row = summarize(update, args, gather_envs(buf), stats, losses, lr)
        write_rank_checksum(update, agent, teacher)
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        bar.set_postfix(success=f"{row['charts/success_rate']:.2f}", kl=f"{row['teacher/kl']:.3f}",
                        sps=f"{row['env_steps'] / row['charts/wall_time']:.1f}")
        stats["episodes"] = stats["episodes"][-args.log_episodes:]
        save_checkpoint(args, update, agent, teacher, opt, envs, history, stats, dagger, demos)
        bar.update(row["env_steps"] - bar.n)
        update += 1
    bar.close()
    if main_rank:
        final_evaluation(agent, teacher, args)
    if n_ranks > 1:
        dist.destroy_process_group()


def held_out(model, args):
    """Held-out levels (split='eval', disjoint from every training level), sampled as in training."""
    from eval import evaluate
    with autocast(args):
        return evaluate(model, args.task, args.eval_episodes, seed=args.seed, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, split=args.eval_split)


def start_evaluation(agent, args):
    """The RL start point (the SFT model) on the held-out levels; saved so the final table can show it."""
    if args.eval_episodes <= 0:
        return
    from eval import json_safe
    row = held_out(agent, args)
    where = "held-out" if args.eval_split == "eval" else "training-distribution"
    print(f"start (SFT) {where} success {row['success']:.3f} over {row['episodes']} episodes")
    atomic_write_text(os.path.join(args.out, "eval_start.json"), json.dumps(json_safe(row), indent=2, allow_nan=False))


def final_evaluation(agent, teacher, args):
    """Start, final agent and its teacher on the same held-out episodes -> a table and eval.json."""
    if args.eval_episodes <= 0:
        return
    from eval import format_table, json_safe
    rows = {}
    start = os.path.join(args.out, "eval_start.json")
    if os.path.isfile(start):
        with open(start) as f:
            rows["start (SFT)"] = json.load(f)  # null where a number was undefined (format_table shows n/a)
    rows["agent"] = held_out(agent, args)
    if teacher is not None:
        rows["teacher"] = held_out(teacher, args)
    print(format_table(rows))
    atomic_write_text(os.path.join(args.out, "eval.json"), json.dumps(json_safe(rows), indent=2, allow_nan=False))


if __name__ == "__main__":
    try:
        main(parse_args())
    except Exception as e:  # the known failures end with one line naming the file or update, no traceback
        from agent import CheckpointError
        if not isinstance(e, (CheckpointError, FloatingPointError, OSError)) or os.environ.get("GTR_DEBUG"):
            raise
        sys.exit(f"error: {e}")
