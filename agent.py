"""agent.py: the VLM agent of GTR-Turbo: one image + a prompt in, one JSON answer out.

What it is (GTR_TURBO.md sections 1, 2 and 6):
- A Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration`), either built tiny in code (random init, a
  byte-level BPE tokenizer trained on the caller's corpus, an image-only processor; nothing downloaded) or
  loaded from any local Qwen2.5-VL checkpoint. Both take the same path afterwards.
- A value head (section 2): an MLP on the last-layer hidden state of the *last prompt token*, so V depends
  only on image + prompt. It shares the backbone.
- Token roles (section 1): generated tokens from the one containing the start of the last `"action":`
  onward (and the EOS) are action tokens; everything generated before is thought. The split comes from
  character offsets of the decoded text, never from token ids.
- `sample` rolls out with a hand-written batched decoder (`decode`): the model's own forward reads the
  prompt once, then each token runs the language model's layers against a preallocated KV cache. The
  same pass yields the per-token log-probs at the sampling temperature, the values and the thought
  entropy, equal to `score`'s full forward over the finished sequence (to 1e-5 in fp32), so no second
  forward is needed. Every model, built or loaded, takes this path.
- Hand-written LoRA for large models (paper: r=128, alpha=256, language model and vision tower), and
  `trainable_state()`: the tensors training changes and the merge (merge.py, section 4.1) combines:
  all weights for tiny/small, the effective LoRA deltas `B @ A * scale` otherwise.

What it leaves out: the losses (distill.py, train.py), the prompts and answer format (env.py), sliding-
window attention (no Qwen2.5-VL checkpoint uses it), multi-image or video input, gradient checkpointing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # a checkpoint every update would print "Writing model shards" bars

from distill import masked_mean, token_logprobs

ACTION_KEY = '"action":'   # the paper's split point: text after the LAST occurrence is the action
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Model sizes built in code. head_dim = hidden / heads; mrope_section must sum to head_dim / 2.
SIZES = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=512, mrope=[4, 6, 6],
                 v_hidden=64, v_layers=1, v_heads=2, v_mlp=128, value_hidden=(256, 128)),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=1024, mrope=[8, 12, 12],
                  v_hidden=128, v_layers=2, v_heads=2, v_mlp=256, value_hidden=(256, 128)),
}
PAPER_VALUE_HIDDEN = (1024, 512)   # RL4VLM / GTR value head for 7B models
PATCH, MERGE = 16, 2               # tiny vision tower: one image token per 32x32 pixels


class CheckpointError(Exception):
    """A checkpoint path that is missing, not a Qwen2.5-VL checkpoint, or has truncated/corrupt files."""


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (every video processor needs torchvision).

    Load it with `ImageOnlyQwen2_5_VLProcessor.from_pretrained(dir)`, never `AutoProcessor` (that silently
    returns only the tokenizer for a directory this class saved).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# ----------------------------------------------------------------------------------------------------
# LoRA (hand-written)

class LoRALinear(nn.Module):
    """y = base(x) + x A^T B^T * (alpha / r), with the base frozen; B starts at zero so y = base(x) at init.

    `delta` (None until `set_delta`) is a dense weight offset used when a trainable state is loaded
    (the teacher): the effective weight is then base + delta + B A scale. It costs one dense copy of
    the layer in the base dtype, so only models that load states (teachers) pay it.
    LoRA factors are kept in fp32 (Adam on bf16 factors is weak); the product is cast back to x's dtype.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))    # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))   # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.delta = None

    def delta_weight(self) -> torch.Tensor:
        """[out, in] fp32: the change of the effective weight from the frozen base."""
        d = (self.lora_B @ self.lora_A) * self.scale
        return d if self.delta is None else d + self.delta.float()

    def set_delta(self, delta: torch.Tensor) -> None:
        """Make the effective weight base + delta exactly (up to the base dtype); zero B."""
        with torch.no_grad():
            if self.delta is None:
                self.delta = torch.zeros_like(self.base.weight)
            self.delta.copy_(delta)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight if self.delta is None else self.base.weight + self.delta
        y = F.linear(x, w, self.base.bias)
        lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return y + lora.to(y.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every nn.Linear of the language model and vision tower (not lm_head; embeddings are not
    Linear) in LoRALinear, freeze everything else. Returns the wrapped module names (in-memory)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not n.split(".")[-1] == "lm_head"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------------
# The padded batch

@dataclass
class Batch:
    """One padded batch of turns: prompt left-padded to P, generated tokens right-padded to G."""
    input_ids: torch.Tensor          # [B, P+G] long
    attention_mask: torch.Tensor     # [B, P+G] long
    mm_token_type_ids: torch.Tensor  # [B, P+G] long, 1 at image tokens (M-RoPE needs it); 0 over gen
    pixel_values: torch.Tensor       # [sum of patches, D] float32, rows in batch order
    image_grid_thw: torch.Tensor     # [B, 3] long (one image per row)
    prompt_len: int                  # P
    gen_mask: torch.Tensor           # [B, G] float: real generated tokens incl. the final EOS
    thought_mask: torch.Tensor       # [B, G] float: before the last `"action":`
    action_mask: torch.Tensor        # [B, G] float: from the token holding the last `"action":` on, + EOS
    logp: torch.Tensor               # [B, G] float: log-probs at `temperature` (0 at pad)
    values: torch.Tensor             # [B] float
    texts: list                      # B decoded answers (no special tokens)
    thought_entropy: torch.Tensor    # [B] float: mean entropy over thought tokens at `temperature`
    temperature: float
    pad_id: int
    teacher_logp: torch.Tensor | None = None   # [B, G] the frozen teacher's log-probs of these tokens (turbo-kl)

    @property
    def gen_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]   # [B, G]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(**{f.name: (v.to(device) if torch.is_tensor(v) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def select(self, idx) -> "Batch":
        """Rows `idx` (list/tensor of ints), keeping P and G; pixel rows follow image_grid_thw."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        counts = self.image_grid_thw.prod(-1).cpu()                       # [B] patches per row
        starts = counts.cumsum(0) - counts
        sel_counts, sel_starts = counts[idx], starts[idx]
        # patch index = start of its row + offset within the row, without a Python loop over patches
        out_starts = sel_counts.cumsum(0) - sel_counts
        pix_idx = (torch.repeat_interleave(sel_starts - out_starts, sel_counts)
                   + torch.arange(int(sel_counts.sum())))
        dev_idx = idx.to(self.input_ids.device)
        row = lambda t: t[dev_idx]
        return Batch(input_ids=row(self.input_ids), attention_mask=row(self.attention_mask),
                     mm_token_type_ids=row(self.mm_token_type_ids),
                     pixel_values=self.pixel_values[pix_idx.to(self.pixel_values.device)],
                     image_grid_thw=row(self.image_grid_thw), prompt_len=self.prompt_len,
                     gen_mask=row(self.gen_mask), thought_mask=row(self.thought_mask),
                     action_mask=row(self.action_mask), logp=row(self.logp), values=row(self.values),
                     texts=[self.texts[i] for i in idx.tolist()], thought_entropy=row(self.thought_entropy),
                     temperature=self.temperature, pad_id=self.pad_id,
                     teacher_logp=None if self.teacher_logp is None else row(self.teacher_logp))

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        """Stack batches whose P and G differ: prompts re-padded left, generations right."""
        if not batches:
            raise ValueError("Batch.cat needs at least one batch")
        temps = {b.temperature for b in batches}
        if len(temps) != 1:
            raise ValueError(f"Batch.cat: batches sampled at different temperatures {sorted(temps)}")
        P = max(b.prompt_len for b in batches)
        G = max(b.gen_ids.shape[1] for b in batches)
        pad = batches[0].pad_id

        def prompt_part(b, t, fill):   # [B, P_b] -> [B, P], left padding
            out = t.new_full((t.shape[0], P), fill)
            out[:, P - b.prompt_len:] = t[:, :b.prompt_len]
            return out

        def gen_part(t, fill):         # [B, G_b] -> [B, G], right padding
            out = t.new_full((t.shape[0], G), fill)
            out[:, :t.shape[1]] = t
            return out

        def seq(name, fill):
            return torch.cat([torch.cat([prompt_part(b, getattr(b, name), fill),
                                         gen_part(getattr(b, name)[:, b.prompt_len:], fill)], 1)
                              for b in batches])

        gen = lambda name: torch.cat([gen_part(getattr(b, name), 0) for b in batches])
        flat = lambda name: torch.cat([getattr(b, name) for b in batches])
        return Batch(input_ids=seq("input_ids", pad), attention_mask=seq("attention_mask", 0),
                     mm_token_type_ids=seq("mm_token_type_ids", 0), pixel_values=flat("pixel_values"),
                     image_grid_thw=flat("image_grid_thw"), prompt_len=P, gen_mask=gen("gen_mask"),
                     thought_mask=gen("thought_mask"), action_mask=gen("action_mask"), logp=gen("logp"),
                     values=flat("values"), texts=[t for b in batches for t in b.texts],
                     thought_entropy=flat("thought_entropy"), temperature=batches[0].temperature,
                     pad_id=pad,
                     teacher_logp=gen("teacher_logp") if all(b.teacher_logp is not None for b in batches) else None)


# ----------------------------------------------------------------------------------------------------
# Building blocks for the tiny model

def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (deterministic for a given corpus) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if isinstance(corpus, str) or not all(isinstance(s, str) for s in corpus):
        raise TypeError("corpus must be a list of str")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # the chat template's own words get merges too, so prompts stay short
    texts = list(corpus) + ["system user assistant\n", '{"thoughts": "", "action": ""}']
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:], padding_side="left")


def build_processor(tokenizer, max_pixels: int, patch: int = PATCH, merge: int = MERGE):
    # sizes are pixel counts; min = one merged token so a small image is never shrunk to nothing
    improc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                      size={"shortest_edge": (patch * merge) ** 2, "longest_edge": max_pixels})
    return ImageOnlyQwen2_5_VLProcessor(image_processor=improc, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_config(size: str, tokenizer) -> Qwen2_5_VLConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    s, tid = SIZES[size], tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": s["mrope"]},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"],
                           num_heads=s["v_heads"], out_hidden_size=s["hidden"], patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, window_size=128,
                           fullatt_block_indexes=list(range(s["v_layers"]))),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def value_mlp(hidden: int, sizes) -> nn.Sequential:
    """hidden -> sizes[0] -> ... -> 1 with ReLU; the last layer starts at zero (V = 0 before training)."""
    dims, layers = [hidden, *sizes], []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    last = nn.Linear(dims[-1], 1)
    nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


# ----------------------------------------------------------------------------------------------------
# Checkpoint checks (clear errors before transformers sees a bad file)

def check_safetensors(path: Path) -> None:
    """Header-level check: 8-byte length, JSON header, tensor data exactly filling the rest of the file."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes, a safetensors file needs at least 8)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt (tensors need {8 + n + end} bytes, file has {size})")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """manifest.json: the SHA-256 of every weight file, so a flipped bit is named at load, not trained on.
    Weight files are made 0644 (safetensors writes 0600), readable like the rest of a run."""
    files = sorted(p.name for p in path.glob("*.safetensors"))
    for name in files:
        os.chmod(path / name, 0o644)
    (path / "manifest.json").write_text(json.dumps({n: sha256_file(path / n) for n in files}, indent=1))


def verify_manifest(path: Path) -> None:
    """The weight files match the SHA-256 saved beside them (a directory without manifest.json passes)."""
    if not (path / "manifest.json").is_file():
        return
    for name, digest in read_json(path / "manifest.json").items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (listed in manifest.json)")
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path / name}: damaged, its SHA-256 differs from the one in manifest.json "
                                  "(a changed or flipped byte)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def check_checkpoint_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing, so {path} is not a transformers checkpoint")
    model_type = read_json(cfg_file).get("model_type")
    if model_type != "qwen2_5_vl":
        raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a Qwen2.5-VL checkpoint "
                              "(need 'qwen2_5_vl')")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: empty weight_map")
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    for shard in shards:
        if not (path / shard).is_file():
            raise CheckpointError(f"{path / shard}: missing (listed in {index.name})")
        check_safetensors(path / shard)
    if not any((path / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        raise CheckpointError(f"{path}: no preprocessor_config.json or processor_config.json (the image "
                              "processor is needed)")
    for name in ("tokenizer_config.json",):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (the tokenizer is needed)")


def looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------------------------------
# The agent

class Agent:
    """A VLM policy with a value head. Build with `Agent.build` (in code) or `Agent.load` (a directory)."""

    def __init__(self, model, processor, *, size: str = "custom", value_hidden=None, value_head=None,
                 lora_rank: int = 0, lora_alpha: float | None = None):
        self.model, self.processor, self.size = model, processor, size
        self.model.eval()   # Qwen configs have no dropout; eval only fixes module flags
        self.value_hidden = tuple(value_hidden or (SIZES[size]["value_hidden"] if size in SIZES
                                                   else PAPER_VALUE_HIDDEN))
        hidden = model.config.text_config.hidden_size
        if value_head is None:
            value_head = value_mlp(hidden, self.value_hidden)
        # the value head stays fp32 whatever the model dtype: it is small and regresses returns
        self.value_head = value_head.to(device=self.device, dtype=torch.float32)
        self.lora_rank, self.lora_alpha = lora_rank, (lora_alpha if lora_alpha is not None else 2.0 * lora_rank)
        if lora_rank > 0:
            apply_lora(self.model, lora_rank, self.lora_alpha)
        tok = self.tokenizer
        tok.padding_side = "left"   # prompts are left-padded so column P-1 is every row's last prompt token
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if im_end is None or im_end == tok.unk_token_id:
            raise ValueError("tokenizer has no <|im_end|> token (ChatML is required)")
        self.im_end_id = im_end
        self.eos_ids = sorted({im_end} | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else im_end
        # generate() fills every option we leave unset from model.generation_config; a checkpoint's own
        # (Qwen ships do_sample, top_p=0.001, top_k=1, repetition_penalty=1.05) would silently change our
        # sampling, so the model keeps only the token ids and `sample` states everything else.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                                        bos_token_id=None)
        self.image_token_id = model.config.image_token_id
        # Vision placeholders in an answer would make the next forward expect image features that do not
        # exist; an early or untrained model does emit them, so sampling never may (pad and the other
        # control tokens likewise). EOS tokens stay allowed.
        cfg = model.config
        banned = {cfg.image_token_id, getattr(cfg, "video_token_id", None), getattr(cfg, "vision_start_token_id", None),
                  getattr(cfg, "vision_end_token_id", None), self.pad_id, tok.convert_tokens_to_ids("<|im_start|>")}
        self.suppress_ids = sorted(i for i in banned if i is not None and i not in self.eos_ids and i != tok.unk_token_id)

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def build(cls, size: str, corpus: list[str], seed: int = 0, device="cpu", dtype=torch.float32,
              max_pixels: int = 256 * 256, vocab_size: int = 512, lora_rank: int = 0,
              lora_alpha: float | None = None, value_hidden=None) -> "Agent":
        """A random-init Qwen2.5-VL of `size` ('tiny' ~1M, 'small' ~5M params) with a tokenizer trained on
        `corpus`. Same seed and corpus -> same weights and tokenizer. Full fine-tuning unless lora_rank>0."""
        tok = build_tokenizer(corpus, vocab_size)
        processor = build_processor(tok, max_pixels)
        torch.manual_seed(seed)   # weights, value head and LoRA init all draw from here, in this order
        # _from_config builds in `dtype` but keeps RoPE's inv_freq buffers fp32 (as from_pretrained does);
        # a later model.to(bf16) would round them too and a saved-then-loaded copy would differ
        model = Qwen2_5_VLForConditionalGeneration._from_config(build_config(size, tok), dtype=dtype).to(device)
        return cls(model, processor, size=size, value_hidden=value_hidden, lora_rank=lora_rank,
                   lora_alpha=lora_alpha)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, lora_rank: int = 0, lora_alpha: float | None = None,
             value_hidden=None, max_pixels: int | None = None) -> "Agent":
        """Any Qwen2.5-VL directory (a saved agent or a plain `save_pretrained` one; the latter gets a
        fresh value head), or a hub id handed to transformers as is. Saved agent settings (size, LoRA,
        value head sizes) win over the arguments; a conflicting LoRA rank is an error."""
        path_s = str(path)
        local = Path(path_s).expanduser()
        settings = {}
        if local.exists():
            check_checkpoint_dir(local)
            verify_manifest(local)
            if (local / "agent.json").is_file():
                settings = read_json(local / "agent.json")
            for name in ("value_head.safetensors", "lora.safetensors"):
                if (local / name).is_file():
                    check_safetensors(local / name)
            src = str(local)
        elif looks_like_hub_id(path_s):
            src = path_s
        else:
            old = local.parent / f".{local.name}.old"
            hint = f" (an interrupted save left the previous copy at {old})" if old.exists() else ""
            raise CheckpointError(f"{local}: no such checkpoint directory{hint}")
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, output_loading_info=True)
            processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(src)
        except CheckpointError:
            raise
        except Exception as e:
            if src == path_s and not local.exists():
                raise CheckpointError(f"{path_s!r} is not a local directory, and fetching it from the "
                                      f"Hugging Face hub failed (hub unreachable, offline, or no such repo): {e}") from e
            raise CheckpointError(f"{src}: transformers could not load it: {e}") from e
        if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
            raise CheckpointError(f"{src}: loaded {type(model).__name__}, not a Qwen2.5-VL model")
        missing = [k for k in info.get("missing_keys", []) if k]
        mism = info.get("mismatched_keys", [])
        if missing or mism:
            raise CheckpointError(f"{src}: weights incomplete (missing {sorted(missing)[:5]}, "
                                  f"mismatched {list(mism)[:5]}): the checkpoint does not match its config")
        if max_pixels is not None:
            processor.image_processor.size = {"shortest_edge": processor.image_processor.size["shortest_edge"],
                                              "longest_edge": max_pixels}
        saved_rank = int(settings.get("lora_rank", 0))
        if saved_rank and lora_rank and lora_rank != saved_rank:
            raise CheckpointError(f"{local / 'agent.json'}: saved LoRA rank {saved_rank} != requested {lora_rank}")
        rank = saved_rank or lora_rank
        alpha = settings.get("lora_alpha", lora_alpha) if saved_rank else lora_alpha
        vh_sizes = settings.get("value_hidden", value_hidden)
        model.to(device)
        agent = cls(model, processor, size=settings.get("size", "custom"), value_hidden=vh_sizes,
                    lora_rank=rank, lora_alpha=alpha)
        if local.exists():
            if (local / "value_head.safetensors").is_file():
                agent._load_part(agent.value_head, local / "value_head.safetensors")
            if saved_rank:
                if not (local / "lora.safetensors").is_file():
                    raise CheckpointError(f"{local / 'lora.safetensors'}: missing, but agent.json says LoRA rank {saved_rank}")
                agent._load_lora(local / "lora.safetensors")
        return agent

    def _load_part(self, module: nn.Module, file: Path) -> None:
        state = load_file(str(file), device=str(self.device))
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{file}: does not fit this agent ({e})") from e

    def _load_lora(self, file: Path) -> None:
        state = load_file(str(file), device=str(self.device))
        mods = lora_modules(self.model)
        want = {f"{n}.{p}" for n in mods for p in ("lora_A", "lora_B")}
        if not want <= set(state):
            raise CheckpointError(f"{file}: missing LoRA tensors, e.g. {sorted(want - set(state))[:3]}")
        with torch.no_grad():
            for n, m in mods.items():
                m.lora_A.copy_(state[f"{n}.lora_A"]), m.lora_B.copy_(state[f"{n}.lora_B"])
                if f"{n}.delta" in state:
                    m.set_delta(state[f"{n}.delta"])
                    m.lora_B.copy_(state[f"{n}.lora_B"])   # set_delta zeroed B; restore the trained one

    def save(self, path) -> None:
        """Write a loadable Qwen2.5-VL directory (+ value head, LoRA factors, agent.json), atomically: into a
        temp dir beside `path`, then renamed into place; an old copy is renamed aside first and removed
        last, so at every moment a complete old or new copy exists (`.<name>.old` if interrupted)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            mods = lora_modules(self.model)
            self._unwrap_lora(mods)   # the base model alone is the standard checkpoint
            try:
                self.model.save_pretrained(tmp)
            finally:
                self._rewrap_lora(mods)
            self.processor.save_pretrained(tmp)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(tmp / "value_head.safetensors"))
            if mods:
                lora = {}
                for n, m in mods.items():
                    lora[f"{n}.lora_A"], lora[f"{n}.lora_B"] = m.lora_A.detach().cpu(), m.lora_B.detach().cpu()
                    if m.delta is not None:
                        lora[f"{n}.delta"] = m.delta.detach().cpu()
                save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
            (tmp / "agent.json").write_text(json.dumps(
                {"size": self.size, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                 "value_hidden": list(self.value_hidden)}, indent=1))
            write_manifest(tmp)
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            if path.exists():
                os.rename(path, old)
            os.rename(tmp, path)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _unwrap_lora(self, mods):
        for n, m in mods.items():
            parent, _, child = n.rpartition(".")
            setattr(self.model.get_submodule(parent), child, m.base)

    def _rewrap_lora(self, mods):
        for n, m in mods.items():
            parent, _, child = n.rpartition(".")
            setattr(self.model.get_submodule(parent), child, m)

    def copy_frozen(self) -> "Agent":
        """A deep copy (model and value head; processor shared) with no gradients, in eval mode: the teacher."""
        new = copy.copy(self)
        new.model, new.value_head = copy.deepcopy(self.model), copy.deepcopy(self.value_head)
        for p in list(new.model.parameters()) + list(new.value_head.parameters()):
            p.requires_grad_(False)
        new.model.eval(), new.value_head.eval()
        return new

    # ---- trainable state (what merge.py combines) --------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU clones. No LoRA: every model weight by in-memory name. LoRA: per wrapped layer the
        effective weight delta (fp32), keyed by the layer's original weight name. Never the value head."""
        mods = lora_modules(self.model)
        if not mods:
            return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        with torch.no_grad():
            return {f"{n}.weight": m.delta_weight().detach().cpu().clone() for n, m in mods.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state; keys and shapes must match exactly."""
        mods = lora_modules(self.model)
        targets = ({f"{n}.weight": m for n, m in mods.items()} if mods
                   else dict(self.model.named_parameters()))
        if set(state) != set(targets):
            extra, missing = sorted(set(state) - set(targets)), sorted(set(targets) - set(state))
            raise KeyError(f"trainable state keys differ: unexpected {extra[:3]}, missing {missing[:3]}")
        with torch.no_grad():
            for k, t in targets.items():
                shape = t.base.weight.shape if mods else t.shape
                if state[k].shape != shape:
                    raise ValueError(f"trainable state {k}: shape {tuple(state[k].shape)} != {tuple(shape)}")
                if mods:
                    t.set_delta(state[k].to(self.device))
                else:
                    t.copy_(state[k])

    # ---- helpers ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_params(self, trainable_only: bool = False) -> int:
        ps = list(self.model.parameters()) + list(self.value_head.parameters())
        return sum(p.numel() for p in ps if p.requires_grad or not trainable_only)

    def parameters(self):
        """Everything an optimizer should update: trainable model weights (or LoRA factors) + value head."""
        return [p for p in list(self.model.parameters()) + list(self.value_head.parameters()) if p.requires_grad]

    # ---- encoding --------------------------------------------------------------------------------------

    def encode_prompts(self, images, prompts) -> dict:
        """Chat template (user turn: one image, then the text) + processor. Returns left-padded
        input_ids/attention_mask/mm_token_type_ids [B, P], pixel_values [patches, D], image_grid_thw [B, 3]."""
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"need as many images as prompts (>0), got {len(images)} and {len(prompts)}")
        pil = []
        for i, im in enumerate(images):
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
                raise ValueError(f"image {i}: need a uint8 HxWx3 numpy array, got "
                                 f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}")
            pil.append([Image.fromarray(im)])   # nested: one image per sample
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(p)}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = self.processor(images=pil, text=texts, return_tensors="pt", padding=True)
        mm = enc.get("mm_token_type_ids")
        if mm is None:   # older transformers: build it (1 at image tokens) so batches look the same
            mm = (enc["input_ids"] == self.image_token_id).long()
        return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], mm_token_type_ids=mm,
                    pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])

    def split_thought_action(self, ids: list[int]) -> int:
        """Number of thought tokens among real generated ids: tokens before the one that holds the start
        of the last `"action":` in the decoded text; all of them if there is no `"action":`."""
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        s = decode(ids).rfind(ACTION_KEY)
        if s < 0:
            return len(ids)
        lo, hi = 1, len(ids)   # smallest k whose decoded prefix reaches past character s (binary search)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(ids[:mid])) > s:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def _make_batch(self, enc: dict, gen: torch.Tensor, temperature: float) -> Batch:
        """gen [B, G'] raw generated/answer ids -> Batch with masks (no model forward yet)."""
        B = gen.shape[0]
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=gen.device))
        gen_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0       # up to and incl. the first EOS
        G = max(int(gen_mask.sum(1).max()), 1)
        gen, gen_mask = gen[:, :G], gen_mask[:, :G]
        gen = torch.where(gen_mask, gen, torch.full_like(gen, self.pad_id))
        n_real = gen_mask.sum(1).tolist()
        rows = gen.tolist()
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        n_thought = torch.tensor([self.split_thought_action(rows[b][:n_real[b]]) for b in range(B)])
        pos = torch.arange(G).unsqueeze(0)                                 # [1, G]
        thought = (pos < n_thought.unsqueeze(1)).to(gen.device) & gen_mask
        action = gen_mask & ~thought
        P = enc["input_ids"].shape[1]
        dev = self.device
        z = torch.zeros(B, device=dev)
        return Batch(input_ids=torch.cat([enc["input_ids"].to(dev), gen.to(dev)], 1),
                     attention_mask=torch.cat([enc["attention_mask"].to(dev), gen_mask.long().to(dev)], 1),
                     mm_token_type_ids=torch.cat([enc["mm_token_type_ids"].to(dev),
                                                  torch.zeros_like(gen, device=dev)], 1),
                     pixel_values=enc["pixel_values"].to(dev), image_grid_thw=enc["image_grid_thw"].to(dev),
                     prompt_len=P, gen_mask=gen_mask.float().to(dev), thought_mask=thought.float().to(dev),
                     action_mask=action.float().to(dev), logp=torch.zeros(B, G, device=dev), values=z,
                     texts=texts, thought_entropy=z.clone(), temperature=float(temperature), pad_id=self.pad_id)

    def _fill_stats(self, batch: Batch) -> Batch:
        """One teacher-forced forward (no grad): logp at the batch temperature, values, thought entropy."""
        with torch.no_grad():
            logp, values, logits = self.score(batch, return_logits=True)
            lp = torch.log_softmax(logits.float() / batch.temperature, -1)           # [B, G, V]
            ent = -(lp.exp() * lp).sum(-1)                                            # [B, G]
            batch.thought_entropy = masked_mean(ent, batch.thought_mask)                # 0 if no thought
            batch.logp, batch.values = logp.detach(), values.detach()
        return batch

    # ---- the three calls PPO makes ---------------------------------------------------------------------

    def sample(self, images, prompts, temperature: float = 0.2, top_k: int = 5, repetition_penalty: float = 1.2,
               max_new_tokens: int = 64, do_sample: bool = True, min_new_tokens: int = 0) -> Batch:
        """Roll out one answer per (image, prompt) with `decode`: one pass gives the tokens, their log-probs
        at `temperature`, the values and the thought entropy. Seed with torch.manual_seed for reproducible
        samples. do_sample=False is greedy (repetition_penalty still applies; pass 1.0 for plain argmax)."""
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy)")
        enc = self.encode_prompts(images, prompts)
        gen, logp, entropy, values = self.decode(enc, temperature, top_k, repetition_penalty, max_new_tokens,
                                                 do_sample, min_new_tokens)
        batch = self._make_batch(enc, gen, temperature)
        G = batch.gen_mask.shape[1]
        batch.logp = logp[:, :G] * batch.gen_mask
        batch.thought_entropy = masked_mean(entropy[:, :G], batch.thought_mask)   # 0 if no thought
        batch.values = values
        return batch

    # ---- the decoder: prefill once, then one token per step against a preallocated KV cache ------------

    def next_tokens(self, logits, seen, step: int, temperature, top_k, repetition_penalty, do_sample,
                    min_new_tokens):
        """logits [B, V] of the next position -> token ids [B], with generate's rules in generate's order:
        repetition penalty on every token already in the row (prompt included), banned and (before
        min_new_tokens) EOS tokens removed, then temperature, top-k and a multinomial draw (or argmax)."""
        scores = logits.float().clone()   # the caller's logits stay untouched (log-probs are read from them)
        if repetition_penalty != 1.0:
            hit = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
            scores = torch.where(seen, hit, scores)
        ban = self.suppress_ids + (self.eos_ids if step < min_new_tokens else [])
        scores[:, ban] = -math.inf
        if not do_sample:
            return scores.argmax(-1)
        scores = scores / temperature
        if top_k:
            kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)

    @torch.no_grad()
    def decode(self, enc, temperature, top_k, repetition_penalty, max_new_tokens, do_sample, min_new_tokens):
        """Batched sampling with a hand-written KV cache. The model's own forward reads the prompt (vision
        tower, M-RoPE positions) once; every later token runs the language model's layers on one position
        against K/V buffers of fixed shape [B, kv_heads, P + max_new_tokens, head_dim]. Generated text
        tokens have all three M-RoPE components equal to (real prompt tokens + g + rope_delta), what
        `generate` uses, so the rotary embedding is the model's own. Returns gen [B, G'] (pad after EOS), the log-prob of
        each token at `temperature` and the entropy of that distribution (both [B, G'], from the logits
        before the repetition penalty and top-k, as `score` computes them), and the values [B]."""
        lm, dev = self.model.model.language_model, self.device
        if getattr(self.model.config.text_config, "use_sliding_window", False):
            raise ValueError("decode: sliding-window attention is not supported")
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev).bool()
        B, P = ids.shape
        out = self.model.model(**self._model_inputs(enc), use_cache=True)
        h = out.last_hidden_state[:, -1:]                                       # [B, 1, H] last prompt token
        values = self.value_head(h[:, 0].float()).squeeze(-1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        S = P + max_new_tokens
        K, V = [], []   # per layer [B, kv_heads, S, head_dim]; the prompt's keys/values copied into columns :P
        for layer in cache.layers:
            for buf, t in ((K, layer.keys), (V, layer.values)):
                buf.append(t.new_zeros(B, t.shape[1], S, t.shape[3]))
                buf[-1][:, :, :P] = t
        del cache, out
        valid = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)        # [B, S]
        # [B] rotary position of gen token 0: real prompt tokens + rope_delta (= the prompt's max position + 1)
        pos = mask.sum(1) + self.model.model.rope_deltas.to(dev).view(B)
        seen = torch.zeros(B, self.model.config.text_config.vocab_size, dtype=torch.bool, device=dev)
        seen.scatter_(1, ids.masked_fill(~mask, ids[0, -1]), True)            # prompt tokens (pads -> a real one)
        gen = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        logp = torch.zeros(B, max_new_tokens, device=dev)
        entropy = torch.zeros(B, max_new_tokens, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eos = torch.tensor(self.eos_ids, device=dev)
        logits = self.model.lm_head(h)[:, 0]                                   # h is already normed
        g = 0
        for g in range(max_new_tokens):
            tok = self.next_tokens(logits, seen, g, temperature, top_k, repetition_penalty, do_sample,
                                   min_new_tokens)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            lp = torch.log_softmax(logits.float() / temperature, -1)           # [B, V]
            logp[:, g] = lp.gather(1, tok[:, None])[:, 0] * ~done
            entropy[:, g] = -(lp.exp() * lp).sum(-1) * ~done
            gen[:, g] = tok
            seen.scatter_(1, tok[:, None], True)
            done |= torch.isin(tok, eos)
            if g + 1 == max_new_tokens or (g % 4 == 3 and bool(done.all())):   # one sync per 4 tokens
                break
            logits = self._decode_step(tok, pos + g, P + g, K, V, valid)
        n = g + 1
        return gen[:, :n].cpu(), logp[:, :n], entropy[:, :n], values   # ids on the CPU: they are decoded there

    def _decode_step(self, tok, pos, col: int, K, V, valid):
        """One position per row through the language model: tok [B] at rotary position pos [B], written
        to cache column col. Returns the next logits [B, V]."""
        lm = self.model.model.language_model
        B = tok.shape[0]
        x = lm.embed_tokens(tok[:, None])                                       # [B, 1, H]
        cos, sin = lm.rotary_emb(x, pos.view(1, B, 1).expand(3, B, 1))
        for i, layer in enumerate(lm.layers):
            att = layer.self_attn
            r = layer.input_layernorm(x)
            q = att.q_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)    # [B, heads, 1, head_dim]
            k = att.k_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)    # [B, kv_heads, 1, head_dim]
            v = att.v_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            K[i][:, :, col] = k[:, :, 0]
            V[i][:, :, col] = v[:, :, 0]
            kv = K[i].shape[1]   # query heads h = kv_head * group + r share kv_head (repeat_kv's order)
            q = q.reshape(B, kv, -1, att.head_dim).to(K[i].dtype)             # [B, kv_heads, group, head_dim]
            s = q @ K[i][:, :, :col + 1].transpose(-1, -2) * att.scaling         # [B, kv_heads, group, col+1]
            s = s.float().masked_fill(~valid[:, None, None, :col + 1], -math.inf)
            o = torch.softmax(s, -1).to(V[i].dtype) @ V[i][:, :, :col + 1]      # [B, kv_heads, group, head_dim]
            x = x + att.o_proj(o.reshape(B, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(lm.norm(x))[:, 0]

    def encode(self, images, prompts, answers, temperature: float = 1.0, fill: bool = True) -> Batch:
        """The Batch `sample` would give if it had generated `answers` (each terminated by <|im_end|>):
        teacher forcing for SFT warm-up and SFT targets; same mask rule, logp/values filled unless
        fill=False (a caller that runs `score` itself saves a forward)."""
        if len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        enc = self.encode_prompts(images, prompts)
        ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.im_end_id] for a in answers]
        G = max(len(r) for r in ids)
        gen = torch.full((len(ids), G), self.pad_id, dtype=torch.long)
        for b, r in enumerate(ids):
            gen[b, :len(r)] = torch.tensor(r)
        batch = self._make_batch(enc, gen, temperature)
        return self._fill_stats(batch) if fill else batch

    def _model_inputs(self, b) -> dict:
        get = (lambda k: b[k]) if isinstance(b, dict) else (lambda k: getattr(b, k))
        dev = self.device
        return dict(input_ids=get("input_ids").to(dev), attention_mask=get("attention_mask").to(dev),
                    mm_token_type_ids=get("mm_token_type_ids").to(dev),
                    pixel_values=get("pixel_values").to(dev, self.dtype), image_grid_thw=get("image_grid_thw").to(dev))

    def score(self, batch: Batch, temperature: float | None = None, return_logits: bool = False):
        """One forward with grad. Returns logp [B, G] at `temperature` (default the batch's; 0 at pad),
        values [B] from the last prompt token, and (optionally) untempered logits [B, G, V] where
        logits[:, g] predicts gen token g."""
        T = batch.temperature if temperature is None else temperature
        P = batch.prompt_len
        out = self.model.model(**self._model_inputs(batch), use_cache=False)
        h = out.last_hidden_state                                        # [B, P+G, H]
        logits = self.model.lm_head(h[:, P - 1:])                        # [B, G+1, V]; pos P-1 predicts gen 0
        logp = token_logprobs(logits, batch.input_ids[:, P - 1:], T) * batch.gen_mask   # [B, G]
        values = self.value_head(h[:, P - 1].float()).squeeze(-1)        # [B]; same column for all rows
        return logp, values, (logits[:, :-1] if return_logits else None)
