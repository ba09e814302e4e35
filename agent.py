"""agent.py: the policy of GTR-Turbo, a Qwen2.5-VL model with a value head (docs/method.md sections 1, 2, 6).

One image and a prompt in, one JSON answer out. The model is built tiny in code (random weights, a BPE tokenizer
trained on the caller's corpus, nothing downloaded) or loaded from a Qwen2.5-VL directory. PPO (section 2) makes
three calls, each returning a `Batch`: `sample` writes answers with a KV-cache decoder and records each token's
log-prob at the sampling temperature, the prompt's value and the thought entropy; `encode` runs one forward to
record the same for given answers (`tokenize`: the same Batch without the forward); `score` is the forward PPO
differentiates. The value head is an MLP on the last prompt token's hidden state. Thought tokens (section 1) are
the generated tokens before the one holding the last `"action":`; that one, the rest and the EOS are action
tokens. `trainable_state` is what the merge (section 4.1) combines. `atomic_write` and the manifest are the
project's one way to write files and to name a damaged one. Not supported: sliding-window attention, video.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VisionPatchEmbed, Qwen2_5_VLVisionAttention,
                                                                apply_rotary_pos_emb, apply_rotary_pos_emb_vision,
                                                                is_flash_attention_requested)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.utils import logging as hf_logging

from distill import masked_mean, token_logprobs

hf_logging.disable_progress_bar()  # a checkpoint every update would print "Writing model shards" bars

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
PAPER_VALUE_HIDDEN = (1024, 512)   # the value head of section 2, for loaded (7B-like) models
PATCH, MERGE = 16, 2               # tiny vision tower: one image token per 32x32 pixels
MAX_PIXELS = 256 * 256             # built processors shrink larger images to this many pixels
VOCAB_SIZE = 512                   # BPE vocabulary of a built tokenizer (special tokens included)


class CheckpointError(Exception):
    """A checkpoint or state file that is missing, of another kind, truncated or damaged; the message names it."""


class Agent:
    """A VLM policy with a value head. Build with `Agent.build` (in code) or `Agent.load` (a directory)."""

    def __init__(self, model, processor, *, size: str = "custom", value_hidden=None, lora_rank: int = 0,
                 lora_alpha: float | None = None):
        self.model, self.processor, self.size = model.eval(), processor, size   # eval: Qwen has no dropout anyway
        speed_up(model)
        self.value_hidden = tuple(value_hidden or SIZES.get(size, {}).get("value_hidden", PAPER_VALUE_HIDDEN))
        # fp32 whatever the model dtype: the head is small and regresses returns
        hidden = model.config.text_config.hidden_size
        self.value_head = value_mlp(hidden, self.value_hidden).to(self.device, torch.float32)
        self.lora_rank, self.lora_alpha = lora_rank, (2.0 * lora_rank if lora_alpha is None else lora_alpha)
        if lora_rank > 0:
            apply_lora(self.model, lora_rank, self.lora_alpha)
        tok = self.tokenizer
        tok.padding_side = "left"   # so that column P-1 holds every row's last prompt token
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        if self.im_end_id in (None, tok.unk_token_id):
            raise ValueError("tokenizer has no <|im_end|> token (ChatML is required)")
        self.eos_ids = sorted({self.im_end_id} | ({tok.eos_token_id} - {None}))
        self.pad_id = self.im_end_id if tok.pad_token_id is None else tok.pad_token_id
        # a checkpoint's own generation_config (Qwen ships top_k=1, repetition_penalty=1.05, ...) would change
        # what generate() does with unset options: keep only the token ids (it is also what `save` writes)
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                                        bos_token_id=None)
        # an untrained model emits vision placeholders, and the next forward would then expect image features
        cfg = model.config
        banned = {cfg.image_token_id, self.pad_id, tok.convert_tokens_to_ids("<|im_start|>")} | {
            getattr(cfg, k, None) for k in ("video_token_id", "vision_start_token_id", "vision_end_token_id")}
        self.suppress_ids = sorted(banned - {None, tok.unk_token_id} - set(self.eos_ids))

    @classmethod
    def build(cls, size: str, corpus: list[str], seed: int = 0, device="cpu", dtype=torch.float32,
              lora_rank: int = 0, lora_alpha: float | None = None) -> "Agent":
        """A random-init Qwen2.5-VL of `size` ('tiny' ~1M, 'small' ~5M params) and a BPE tokenizer trained on
        `corpus`: the same for the same seed and corpus. LoRA on every linear layer if lora_rank > 0."""
        tok = build_tokenizer(corpus)
        torch.manual_seed(seed)   # weights, value head and LoRA init all draw from here, in this order
        # _from_config keeps RoPE's inv_freq fp32 (as from_pretrained does); a later model.to(bf16) would round
        # them too, and a saved-then-loaded copy would differ
        model = Qwen2_5_VLForConditionalGeneration._from_config(build_config(size, tok), dtype=dtype).to(device)
        return cls(model, build_processor(tok), size=size, lora_rank=lora_rank, lora_alpha=lora_alpha)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- the three calls PPO makes ------------------------------------------------------------------

    def sample(self, images, prompts, temperature: float = 0.2, top_k: int = 5, repetition_penalty: float = 1.2,
               max_new_tokens: int = 64, do_sample: bool = True, min_new_tokens: int = 0) -> Batch:
        """One answer per (image, prompt) by `decode` (no grad), seeded by torch.manual_seed. do_sample=False:
        greedy after the repetition penalty (1.0 for plain argmax)."""
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy)")
        enc = self.tokenize_prompts(images, prompts)
        gen, logp, entropy, values = self.decode(enc, temperature, top_k, repetition_penalty, max_new_tokens,
                                                 do_sample, min_new_tokens)
        return self._with_stats(self._as_batch(enc, gen, temperature), logp, entropy, values)

    def encode(self, images, prompts, answers, temperature: float = 1.0) -> Batch:
        """The Batch `sample` would give had it written `answers`: `tokenize` + one forward (no grad)."""
        batch = self.tokenize(images, prompts, answers, temperature)
        with torch.no_grad():
            logp, values, logits = self.score(batch, return_logits=True)
            lp = torch.log_softmax(logits.float() / batch.temperature, -1)            # [B, G, V]
            return self._with_stats(batch, logp, -(lp.exp() * lp).sum(-1), values)

    def score(self, batch: Batch, temperature: float | None = None, return_logits: bool = False):
        """One forward with grad -> logp [B, G] at `temperature` (default the batch's; 0 at pad), values [B],
        and if asked the untempered logits [B, G, V], logits[:, g] predicting gen token g (else None)."""
        T, P = batch.temperature if temperature is None else temperature, batch.prompt_len
        h = self.model.model(**self._model_inputs(batch), use_cache=False).last_hidden_state   # [B, P+G, H]
        logits = self.model.lm_head(h[:, P - 1:])                        # [B, G+1, V]; pos P-1 predicts gen 0
        logp = token_logprobs(logits, batch.input_ids[:, P - 1:], T) * batch.gen_mask   # [B, G]
        values = self.value_head(h[:, P - 1].float()).squeeze(-1)        # [B]; left padding: one column for all
        return logp, values, (logits[:, :-1] if return_logits else None)

    def tokenize(self, images, prompts, answers, temperature: float = 1.0) -> Batch:
        """`encode` without the forward (logp, values, thought_entropy zero), for a caller that runs `score`."""
        if len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        enc = self.tokenize_prompts(images, prompts)   # first: a saved tokenizer.json keeps the last call's padding
        ids = [torch.tensor(self.tokenizer(a, add_special_tokens=False)["input_ids"] + [self.im_end_id])
               for a in answers]
        gen = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_id)   # [B, G']
        return self._as_batch(enc, gen, temperature)

    # ---- from prompts and token ids to a Batch ------------------------------------------------------

    def tokenize_prompts(self, images, prompts) -> dict:
        """Chat template (user turn: one image, then the text) + processor -> left-padded input_ids,
        attention_mask, mm_token_type_ids [B, P], pixel_values [patches, D], image_grid_thw [B, 3]."""
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"need as many images as prompts (>0), got {len(images)} and {len(prompts)}")
        for i, im in enumerate(images):
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
                raise ValueError(f"image {i}: need a uint8 HxWx3 numpy array, got "
                                 f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}")
        chat = {p: self.processor.apply_chat_template(   # rendered once per distinct prompt
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for p in set(map(str, prompts))}
        texts = [chat[str(p)] for p in prompts]
        enc = self.encode_direct(images, texts) or self.processor(
            images=[[Image.fromarray(im)] for im in images], text=texts, return_tensors="pt", padding=True)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                    "image_grid_thw")}

    def encode_direct(self, images, texts) -> dict | None:
        """The processor's output as one array op over the batch, when the processor is the PIL one and every
        image has one size that needs no resizing (the case of every env here): the same numbers, bit for bit,
        without the per-image PIL work that dominates a prompt's cost on a CPU. None otherwise."""
        ip, H, W = self.processor.image_processor, *images[0].shape[:2]
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        if not (type(ip) is Qwen2VLImageProcessorPil and ip.do_rescale and ip.do_normalize
                and all(im.shape == images[0].shape for im in images)
                and smart_resize(H, W, p * m, ip.size.shortest_edge, ip.size.longest_edge) == (H, W)):
            return None
        # the processor's arithmetic (rescale in float64, then normalize in float32) for each of the 256 values
        lut = (np.arange(256, dtype=np.float64)[:, None] * ip.rescale_factor).astype(np.float32)     # [256, C]
        lut = (lut - np.array(ip.image_mean, np.float32)) / np.array(ip.image_std, np.float32)
        N, C, gh, gw = len(images), lut.shape[1], H // p, W // p
        x = torch.from_numpy(np.stack(images)).long() + 256 * torch.arange(C)                  # [N, H, W, C]
        x = torch.from_numpy(lut.T.copy()).view(-1)[x]                     # value v of channel c at lut[v, c]
        # rows in merge order (gh/m, gw/m, m, m), columns (C, temporal copies of the frame, p, p)
        x = x.view(N, gh // m, m, p, gw // m, m, p, C).permute(0, 1, 4, 2, 5, 7, 3, 6)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], t, p, p)
        texts = [s.replace(self.processor.image_token, self.processor.image_token * (gh * gw // m ** 2)) for s in texts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return dict(enc, mm_token_type_ids=(enc["input_ids"] == self.processor.image_token_id).long(),
                    pixel_values=x.reshape(N * gh * gw, C * t * p * p),
                    image_grid_thw=torch.tensor([[1, gh, gw]] * N))

    def split_thought_action(self, ids: list[int]) -> int:
        """How many of the real generated `ids` are thought: those before the token holding the start of the
        last `"action":` in the decoded text (all if none). By characters: BPE may merge the quote leftwards."""
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        s = decode(ids).rfind(ACTION_KEY)
        # else the smallest k >= 1 whose decoded prefix reaches past character s, minus 1 (binary search)
        return len(ids) if s < 0 else bisect.bisect_right(range(1, len(ids)), s, key=lambda k: len(decode(ids[:k])))

    def _as_batch(self, enc: dict, gen: torch.Tensor, temperature: float) -> Batch:
        """Prompts + gen [B, G'] generated or answer ids -> Batch with masks; logp, values, entropy zero."""
        B, dev = gen.shape[0], self.device
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=gen.device)).long()
        gen_mask = (is_eos.cumsum(1) - is_eos) == 0                       # up to and incl. the first EOS
        G = max(int(gen_mask.sum(1).max()), 1)
        gen, gen_mask = gen[:, :G], gen_mask[:, :G]
        gen = torch.where(gen_mask, gen, torch.full_like(gen, self.pad_id))
        n_real, rows = gen_mask.sum(1).tolist(), gen.tolist()
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        n_thought = torch.tensor([self.split_thought_action(rows[b][:n_real[b]]) for b in range(B)])
        thought = (torch.arange(G)[None] < n_thought[:, None]).to(gen.device) & gen_mask   # [B, G]
        gen, gen_mask, thought = gen.to(dev), gen_mask.to(dev), thought.to(dev)
        enc, z = {k: v.to(dev) for k, v in enc.items()}, torch.zeros(B, device=dev)
        return Batch(input_ids=torch.cat([enc["input_ids"], gen], 1),
                     attention_mask=torch.cat([enc["attention_mask"], gen_mask.long()], 1),
                     mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(gen)], 1),
                     pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                     prompt_len=enc["input_ids"].shape[1], gen_mask=gen_mask.float(),
                     thought_mask=thought.float(), action_mask=(gen_mask & ~thought).float(),
                     logp=torch.zeros(B, G, device=dev), teacher_logp=torch.zeros(B, G, device=dev), values=z,
                     texts=texts, thought_entropy=z.clone(), temperature=float(temperature), pad_id=self.pad_id)

    @staticmethod
    def _with_stats(batch: Batch, logp, entropy, values) -> Batch:
        """Per-token log-probs and entropies [B, >= G] and values [B] into the batch (logp 0 at pad)."""
        G = batch.gen_mask.shape[1]
        batch.logp = logp[:, :G] * batch.gen_mask
        batch.thought_entropy = masked_mean(entropy[:, :G], batch.thought_mask)   # 0 if no thought
        batch.values = values
        return batch

    def _model_inputs(self, b) -> dict:
        """The model's keyword inputs from a Batch or a `tokenize_prompts` dict, on the model's device."""
        get = b.__getitem__ if isinstance(b, dict) else lambda k: getattr(b, k)
        x = {k: get(k).to(self.device) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
        return dict(x, pixel_values=get("pixel_values").to(self.device, next(self.model.parameters()).dtype))

    # ---- the KV-cache decoder behind `sample` -------------------------------------------------------

    @torch.no_grad()
    def decode(self, enc, temperature, top_k, repetition_penalty, max_new_tokens, do_sample, min_new_tokens):
        """Sampling against a hand-written KV cache: the model's forward reads the prompt once (vision tower,
        M-RoPE positions), then each new token runs the language model on one position against preallocated K/V
        buffers. Returns gen [B, G'] (pad after EOS, on the CPU), each token's log-prob and its distribution's
        entropy at `temperature` ([B, G'] both; before penalty and top-k, as `score` has them), values [B]."""
        dev = self.device
        if getattr(self.model.config.text_config, "use_sliding_window", False):
            raise ValueError("decode: sliding-window attention is not supported")
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev).bool()
        B, P = ids.shape
        out = self.model.model(**self._model_inputs(enc), use_cache=True)
        h = out.last_hidden_state[:, -1:]                                       # [B, 1, H] last prompt token
        values = self.value_head(h[:, 0].float()).squeeze(-1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values   # transformers < 5.25: the latter
        K, V = [], []   # per layer [B, kv_heads, P + max_new_tokens, head_dim], the prompt's in columns :P
        for layer in cache.layers:
            for buf, t in ((K, layer.keys), (V, layer.values)):
                buf.append(t.new_zeros(B, t.shape[1], P + max_new_tokens, t.shape[3]))
                buf[-1][:, :, :P] = t
        del cache, out
        valid = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)        # [B, P + max_new_tokens]
        # [B] rotary position of gen token 0 in all three M-RoPE components, as in `generate`: real prompt
        # tokens + rope_delta (= the prompt's max position + 1)
        pos = mask.sum(1) + self.model.model.rope_deltas.to(dev).view(B)
        seen = torch.zeros(B, self.model.config.text_config.vocab_size, dtype=torch.bool, device=dev)
        seen.scatter_(1, ids.masked_fill(~mask, ids[0, -1]), True)            # prompt tokens (pads -> a real one)
        gen = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        logp, entropy = torch.zeros(B, max_new_tokens, device=dev), torch.zeros(B, max_new_tokens, device=dev)
        done, eos = torch.zeros(B, dtype=torch.bool, device=dev), torch.tensor(self.eos_ids, device=dev)
        logits, g = self.model.lm_head(h)[:, 0], 0                             # h is already normed
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
            if g + 1 == max_new_tokens or (g % 4 == 3 and bool(done.all())):   # one host sync per 4 tokens
                break
            logits = self._decode_step(tok, pos + g, P + g, K, V, valid)
        return gen[:, :g + 1].cpu(), logp[:, :g + 1], entropy[:, :g + 1], values   # ids are decoded on the CPU

    def next_tokens(self, logits, seen, step: int, temperature, top_k, repetition_penalty, do_sample,
                    min_new_tokens):
        """logits [B, V] -> token ids [B] by generate's rules in generate's order: repetition penalty on every
        token already in the row (prompt included), banned and (before min_new_tokens) EOS tokens removed,
        then temperature, top-k and a multinomial draw (or argmax)."""
        scores = logits.float().clone()   # the caller's logits stay untouched (log-probs are read from them)
        if repetition_penalty != 1.0:
            hit = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
            scores = torch.where(seen, hit, scores)
        scores[:, self.suppress_ids + (self.eos_ids if step < min_new_tokens else [])] = -math.inf
        if not do_sample:
            return scores.argmax(-1)
        scores = scores / temperature
        if top_k:
            kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)

    def _decode_step(self, tok, pos, col: int, K, V, valid):
        """tok [B] at rotary position pos [B] through the language model, K/V into column col -> logits [B, V]."""
        lm, B = self.model.model.language_model, tok.shape[0]
        x = lm.embed_tokens(tok[:, None])                                       # [B, 1, H]
        cos, sin = lm.rotary_emb(x, pos.view(1, B, 1).expand(3, B, 1))
        for i, layer in enumerate(lm.layers):
            att, r = layer.self_attn, layer.input_layernorm(x)
            q = att.q_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)    # [B, heads, 1, head_dim]
            k = att.k_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)    # [B, kv_heads, 1, head_dim]
            v = att.v_proj(r).view(B, 1, -1, att.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            K[i][:, :, col], V[i][:, :, col] = k[:, :, 0], v[:, :, 0]
            kv = K[i].shape[1]   # query heads h = kv_head * group + r share kv_head (repeat_kv's order)
            q = q.reshape(B, kv, -1, att.head_dim).to(K[i].dtype)             # [B, kv_heads, group, head_dim]
            s = q @ K[i][:, :, :col + 1].transpose(-1, -2) * att.scaling         # [B, kv_heads, group, col+1]
            s = s.float().masked_fill(~valid[:, None, None, :col + 1], -math.inf)
            o = torch.softmax(s, -1).to(V[i].dtype) @ V[i][:, :, :col + 1]      # [B, kv_heads, group, head_dim]
            x = x + att.o_proj(o.reshape(B, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(lm.norm(x))[:, 0]

    # ---- trainable state (what the optimizer updates and merge.py combines) -------------------------

    def parameters(self) -> list:
        """What an optimizer updates: the trainable model weights (or LoRA factors), then the value head."""
        return [p for p in list(self.model.parameters()) + list(self.value_head.parameters()) if p.requires_grad]

    def num_params(self) -> int:
        return sum(p.numel() for m in (self.model, self.value_head) for p in m.parameters())

    @torch.no_grad()
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the model weights by name; with LoRA, each layer's effective weight minus its base (fp32)."""
        if mods := lora_modules(self.model):
            return {f"{n}.weight": m.delta_weight().detach().cpu().clone() for n, m in mods.items()}
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state; keys and shapes must match exactly."""
        mods = lora_modules(self.model)
        targets = {f"{n}.weight": m for n, m in mods.items()} if mods else dict(self.model.named_parameters())
        if set(state) != set(targets):
            extra, missing = sorted(set(state) - set(targets)), sorted(set(targets) - set(state))
            raise KeyError(f"trainable state keys differ: unexpected {extra[:3]}, missing {missing[:3]}")
        for k, t in targets.items():
            if state[k].shape != (shape := t.base.weight.shape if mods else t.shape):
                raise ValueError(f"trainable state {k}: shape {tuple(state[k].shape)} != {tuple(shape)}")
            if mods:
                t.set_delta(state[k].to(self.device))
            else:
                t.copy_(state[k])

    def copy_frozen(self) -> "Agent":
        """A deep copy (model and value head; processor shared) with no gradients, in eval mode: the teacher."""
        new = copy.copy(self)
        new.model, new.value_head = copy.deepcopy(self.model), copy.deepcopy(self.value_head)
        for m in (new.model, new.value_head):
            m.requires_grad_(False).eval()
        return new

    # ---- save / load ----------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Atomically write a directory transformers loads (the base model without LoRA, the processor) +
        value_head.safetensors, lora.safetensors (factors and loaded deltas), agent.json, manifest.json."""
        mods, own = lora_modules(self.model), {"value_head": self.value_head.state_dict()}
        if mods:   # the factors, and the deltas of a loaded trainable state
            own["lora"] = {f"{n}.{k}": t for n, m in mods.items() for k, t in
                           (("lora_A", m.lora_A), ("lora_B", m.lora_B), ("delta", m.delta)) if t is not None}
        settings = {"size": self.size, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                    "value_hidden": list(self.value_hidden)}

        def write(tmp: Path) -> None:
            for n, m in mods.items():   # the base model alone is the standard checkpoint
                self.model.set_submodule(n, m.base)
            try:
                self.model.save_pretrained(tmp)
            finally:
                for n, m in mods.items():
                    self.model.set_submodule(n, m)
            self.processor.save_pretrained(tmp)
            for name, tensors in own.items():
                file = str(tmp / f"{name}.safetensors")
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, file)
            (tmp / "agent.json").write_text(json.dumps(settings, indent=1))
            for f in tmp.glob("*.safetensors"):   # safetensors writes 0600; a run's files are readable
                os.chmod(f, 0o644)
            write_manifest(tmp)

        atomic_write(Path(path).expanduser(), write)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, lora_rank: int = 0,
             lora_alpha: float | None = None) -> "Agent":
        """A directory from `save` (its settings win over the arguments; another lora_rank is an error) or from
        `save_pretrained` (a fresh value head), or a hub id. Each failure is one CheckpointError naming the file."""
        local, hub = Path(path).expanduser(), hub_id(path)
        if not hub:
            check_checkpoint(local)
        settings = read_settings(local / "agent.json") if (local / "agent.json").is_file() else {}
        src = str(path) if hub else str(local)
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, output_loading_info=True)
            processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(src)
        except Exception as e:
            hint = " (not a local directory, and the Hugging Face hub is unreachable, offline or has no such repo)"
            raise CheckpointError(f"{src}: transformers could not load it{hint if hub else ''}: {e}") from e
        if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
            raise CheckpointError(f"{src}: loaded {type(model).__name__}, not a Qwen2.5-VL model")
        # transformers only warns about weights it had to initialise at random
        missing, mismatched = [k for k in info.get("missing_keys", []) if k], list(info.get("mismatched_keys", []))
        if missing or mismatched:
            raise CheckpointError(f"{src}: the weights do not match its config (missing {sorted(missing)[:5]}, "
                                  f"wrong shape {mismatched[:5]})")
        saved_rank = int(settings.get("lora_rank", 0))
        if saved_rank and lora_rank and lora_rank != saved_rank:
            raise CheckpointError(f"{local / 'agent.json'}: saved LoRA rank {saved_rank} != requested {lora_rank}")
        agent = cls(model.to(device), processor, size=settings.get("size", "custom"),
                    value_hidden=settings.get("value_hidden"), lora_rank=saved_rank or lora_rank,
                    lora_alpha=settings.get("lora_alpha", lora_alpha) if saved_rank else lora_alpha)
        if settings or (local / "value_head.safetensors").is_file():   # `save` writes it beside agent.json
            agent._read_weights(local / "value_head.safetensors", agent.value_head.load_state_dict)
        if saved_rank:
            agent._read_weights(local / "lora.safetensors", agent._set_lora)
        return agent

    @torch.no_grad()
    def _set_lora(self, state: dict) -> None:
        for n, m in lora_modules(self.model).items():
            if f"{n}.delta" in state:
                m.set_delta(state[f"{n}.delta"])   # zeroes B, which is copied next
            m.lora_A.copy_(state[f"{n}.lora_A"]), m.lora_B.copy_(state[f"{n}.lora_B"])

    def _read_weights(self, file: Path, load) -> None:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing, though agent.json says the agent was saved with it")
        try:
            load(load_file(str(file), device=str(self.device)))
        except (KeyError, RuntimeError) as e:   # a missing tensor or another shape
            raise CheckpointError(f"{file} does not fit this agent ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------
# The padded batch every call passes around

@dataclass
class Batch:
    """One padded batch of turns: prompt left-padded to P, generated tokens right-padded to G. Made by
    Agent.sample (decoding), Agent.encode (one forward) or Agent.tokenize (no forward: logp, values, entropy 0)."""
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
    teacher_logp: torch.Tensor       # [B, G] float: the teacher's log-probs of the same tokens (turbo-kl; else 0)
    values: torch.Tensor             # [B] float
    texts: list                      # B decoded answers (no special tokens)
    thought_entropy: torch.Tensor    # [B] float: mean entropy over thought tokens at `temperature`
    temperature: float
    pad_id: int

    @property
    def gen_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]   # [B, G]

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}

    def to(self, device) -> "Batch":
        return replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def select(self, idx) -> "Batch":
        """Rows `idx` (list/tensor of ints), keeping P and G; pixel rows follow image_grid_thw."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        counts = self.image_grid_thw.prod(-1).cpu()                       # [B] patches per row
        starts, n = (counts.cumsum(0) - counts)[idx], counts[idx]
        # patch index = start of its row + offset within the row, without a Python loop over patches
        pix = torch.repeat_interleave(starts - (n.cumsum(0) - n), n) + torch.arange(int(n.sum()))
        rows = {k: v[idx.to(v.device)] for k, v in self._tensors().items() if k != "pixel_values"}
        return replace(self, **rows, pixel_values=self.pixel_values[pix.to(self.pixel_values.device)],
                       texts=[self.texts[i] for i in idx.tolist()])

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        """Stack batches whose P and G differ: prompts re-padded on the left, generations on the right."""
        if len(temps := {b.temperature for b in batches}) != 1:
            raise ValueError(f"Batch.cat: batches sampled at different temperatures {sorted(temps)}")
        P, G = max(b.prompt_len for b in batches), max(b.gen_ids.shape[1] for b in batches)

        def pad(k, prompt: bool, fill=0):   # [B_i, P_i+G_i] -> [B_i, P+G] if prompt, else [B_i, G_i] -> [B_i, G]
            return torch.cat([F.pad(getattr(b, k), (prompt * (P - b.prompt_len), G - b.gen_ids.shape[1]), value=fill)
                              for b in batches])

        row = lambda k: torch.cat([getattr(b, k) for b in batches])
        gen_keys = ("gen_mask", "thought_mask", "action_mask", "logp", "teacher_logp")
        return replace(batches[0], input_ids=pad("input_ids", True, batches[0].pad_id), prompt_len=P,
                       texts=[t for b in batches for t in b.texts],
                       **{k: pad(k, True) for k in ("attention_mask", "mm_token_type_ids")},
                       **{k: pad(k, False) for k in gen_keys},
                       **{k: row(k) for k in ("pixel_values", "image_grid_thw", "values", "thought_entropy")})


# ----------------------------------------------------------------------------------------------------
# Building: tokenizer, processor, config, speed-ups, value head, LoRA

def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (deterministic for a given corpus) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = list(corpus) + ["system user assistant\n", '{"thoughts": "", "action": ""}']   # short prompts too
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:], padding_side="left")


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Without the video processor (they all need torchvision); `AutoProcessor` would return only the tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(tokenizer) -> ImageOnlyQwen2_5_VLProcessor:
    # sizes are pixel counts; min = one merged token so a small image is never shrunk to nothing
    improc = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                      size={"shortest_edge": (PATCH * MERGE) ** 2, "longest_edge": MAX_PIXELS})
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
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"],
                           num_heads=s["v_heads"], out_hidden_size=s["hidden"], patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, window_size=128,
                           fullatt_block_indexes=list(range(s["v_layers"]))),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


class LinearPatchEmbed(Qwen2_5_VisionPatchEmbed):
    """The patch embedding as the matmul it is (its Conv3d has kernel = stride = one patch): [patches, C*T*P*P]
    @ W^T. The same math; a CPU runs a plain matmul and its backward far faster than a Conv3d."""

    def forward(self, x):
        w = self.proj.weight
        return F.linear(x.view(-1, w[0].numel()).to(w.dtype), w.view(w.shape[0], -1))


class BatchedVisionAttention(Qwen2_5_VLVisionAttention):
    """Attention within each image (or window) as one batched matmul when all have the same number of patches;
    without flash-attention transformers makes one attention call per image. Else the original forward."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = cu_seqlens.diff()
        if is_flash_attention_requested(self.config) or bool((lengths != lengths[0]).any()):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        S, L = hidden_states.shape[0], int(lengths[0])
        q, k, v = self.qkv(hidden_states).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)             # [S, heads, head_dim]
        q, k, v = (t.reshape(S // L, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [S/L, heads, L, d]
        o = torch.softmax((q @ k.transpose(-1, -2)).float() * self.scaling, -1).to(v.dtype) @ v
        return self.proj(o.transpose(1, 2).reshape(S, -1))


FAST_CLASSES = {Qwen2_5_VisionPatchEmbed: LinearPatchEmbed, Qwen2_5_VLVisionAttention: BatchedVisionAttention}


def speed_up(model) -> None:
    """Swap in the two exact vision rewrites above; on a CPU also eager attention in the language model (at these
    short sequences torch's CPU flash-attention backward is much slower than the explicit softmax)."""
    for m in model.modules():
        m.__class__ = FAST_CLASSES.get(type(m), type(m))
    if next(model.parameters()).device.type == "cpu":
        model.set_attn_implementation("eager")


def value_mlp(hidden: int, sizes) -> nn.Sequential:
    """hidden -> sizes[0] -> ... -> 1 with ReLU; the last layer starts at zero (V = 0 before training)."""
    dims, layers = [hidden, *sizes], []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    last = nn.Linear(dims[-1], 1)
    nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class LoRALinear(nn.Module):
    """y = x (W + delta)^T + b + x A^T B^T alpha/r with W, b frozen and B zero at first. `delta` is a loaded
    trainable state (a merged teacher's is not low-rank): dense, so None until one is loaded. A, B stay fp32
    (Adam on bf16 factors is weak)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.delta, dev = base, alpha / rank, None, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))    # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))   # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """[out, in] fp32: the effective weight minus the frozen base."""
        d = (self.lora_B @ self.lora_A) * self.scale
        return d if self.delta is None else d + self.delta.float()

    @torch.no_grad()
    def set_delta(self, delta: torch.Tensor) -> None:
        """Make the effective weight base + delta (rounded to the base dtype): B is zeroed."""
        if self.delta is None:
            self.delta = torch.zeros_like(self.base.weight)
        self.delta.copy_(delta)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight if self.delta is None else self.base.weight + self.delta, self.base.bias)
        return y + (F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale).to(y.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Freeze the model; wrap every nn.Linear of the language model and vision tower (not lm_head)."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"]
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------------
# Files: the one atomic write of the project, manifests, checkpoint checks

def atomic_write(path, write, tmp=None, keep_prev=None) -> None:
    """`write(tmp)` fills a file or directory `tmp` (default: a unique name beside `path`), then a rename makes it
    `path`, so a crash leaves the old or the new copy. An old directory is renamed aside (rename cannot replace
    a non-empty one), then removed or kept as `keep_prev`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp else path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if tmp.is_file():  # on disk before the rename makes it the file
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if path.is_dir():
            old = path.parent / (keep_prev or f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            if not keep_prev:
                shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path) -> dict:
    """The JSON object in `path`; a file that holds none is one CheckpointError naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:   # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path} is damaged (not readable JSON: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object)")
    return obj


AGENT_JSON = {"size": lambda v: isinstance(v, str), "lora_rank": lambda v: type(v) is int and v >= 0,
              "lora_alpha": lambda v: type(v) in (int, float),
              "value_hidden": lambda v: isinstance(v, list) and all(type(n) is int and n > 0 for n in v)}


def read_settings(path) -> dict:
    """A saved agent's agent.json; a value of the wrong type is one CheckpointError naming the file."""
    settings = read_json(path)
    for key, ok in AGENT_JSON.items():
        if key in settings and not ok(settings[key]):
            raise CheckpointError(f"{path} is damaged ({key} = {settings[key]!r})")
    return settings


def hub_id(path) -> bool:
    """An `owner/name` that is no local path: nothing there and no local directory `owner` (runs/x is a run)."""
    local = Path(path).expanduser()
    return bool(not local.exists() and not local.parent.is_dir()
                and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)))


def write_manifest(path) -> None:
    """path/manifest.json: the SHA-256 of every file under `path` by relative POSIX path, so that a damaged
    file is named at load, not trained on. A nested manifest.json's hashes are taken as they are, and it is
    hashed itself: a damaged one fails the outer check, not a load after it."""
    path, known, files = Path(path), {}, []
    for f in path.rglob("*"):
        if f.name == "manifest.json" and f.parent != path:
            sub = f.parent.relative_to(path).as_posix()
            known.update({f"{sub}/{name}": digest for name, digest in read_json(f).items()})
        if f.is_file() and f != path / "manifest.json":
            files.append(f.relative_to(path).as_posix())
    atomic_write_text(path / "manifest.json", json.dumps(
        {name: known.get(name) or sha256_file(path / name) for name in sorted(files)}, indent=1))


def verify_manifest(path) -> None:
    """Every file path/manifest.json lists is there with the same SHA-256 (no manifest.json: passes)."""
    manifest = Path(path) / "manifest.json"
    for name, digest in (read_json(manifest) if manifest.is_file() else {}).items():
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {manifest})")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one saved in {manifest}")


def check_checkpoint(path: Path) -> None:
    """The first problem of a checkpoint directory as one CheckpointError, before transformers reads it: not
    there, not a Qwen2.5-VL config, a safetensors file cut short or corrupt, a file that differs from the
    manifest (which names any other missing or changed file of a saved agent)."""
    if not path.exists():
        old = path.parent / f".{path.name}.old"   # where atomic_write keeps a directory while replacing it
        raise CheckpointError(f"{path}: no such checkpoint directory" + (
            f" (an interrupted save left the previous copy at {old})" if old.exists() else ""))
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing, so {path} is not a transformers checkpoint")
    if (kind := read_json(cfg).get("model_type")) != "qwen2_5_vl":
        raise CheckpointError(f"{cfg}: model_type {kind!r} is not a Qwen2.5-VL checkpoint (need 'qwen2_5_vl')")
    for file in sorted(path.glob("*.safetensors")):   # model shards, value head, LoRA
        try:   # safetensors' header check: 8-byte length, JSON header, tensors that exactly fill the file
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:
            raise CheckpointError(f"{file} is truncated or corrupt ({e})") from None
    verify_manifest(path)
