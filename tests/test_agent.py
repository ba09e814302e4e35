"""Tests of agent.py: masks, log-prob identities, padding invariance, checkpoints, LoRA, seeding.

One tiny agent is built and briefly SFT-trained per module (random-init models emit EOS at once), so it
answers in JSON; every check compares numbers computed two independent ways.
"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import agent as agent_mod
from agent import Agent, Batch, CheckpointError, lora_modules, read_json, verify_manifest, write_manifest

ANSWERS = ['{"thoughts":"player 2,4 box 2,2 so left.","action":"left"}',
           '{"thoughts":"player 1,1 box 3,1 so down.","action":"down"}',
           '{"cards":["3","8","3","8"],"formula":"8/(3","thoughts":"need 3-8/3.","action":"-"}',
           '{"thoughts":"player 4,3 box 2,3 so up.","action":"up"}']
PROMPTS = ["Sokoban. Push every box onto a target. Legal actions: up, down, left, right. Answer in JSON.",
           "Sokoban. Legal actions: up, down, left, right.",
           "Points24. Make 24 from the four cards. Legal actions: 1-9, +, -, *, /, (, ), =.",
           "Gridworld. Reach the goal. Legal actions: up, down, left, right. Answer with thoughts and action."]
CORPUS = ANSWERS + PROMPTS


def images(n, seed=0, shape=(96, 96, 3)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def sft(agent, imgs, prompts, answers, steps=50, lr=3e-3):
    """Teacher-forced cross-entropy on whole answers via tokenize + score."""
    opt = torch.optim.Adam(agent.parameters(), lr=lr)
    batch = agent.tokenize(imgs, prompts, answers)
    for _ in range(steps):
        logp, _, _ = agent.score(batch)
        loss = -logp.sum() / batch.gen_mask.sum()
        opt.zero_grad(), loss.backward(), opt.step()
    return loss.item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split: 1 thread is several times faster than 2 here (and far
    faster when another process holds a core, where OpenMP threads spin). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def agent():
    torch.manual_seed(0)
    a = Agent.build("tiny", CORPUS, seed=0)
    loss = sft(a, images(4), PROMPTS, ANSWERS)
    assert loss < 0.5, f"SFT warm-up did not fit 4 answers (loss {loss:.3f})"
    return a


def token_spans(tok, ids):
    """Character span of each token in the decoded text, by decoding prefixes one at a time."""
    ends = [len(tok.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


def test_build_offline_seeded():
    a, b = Agent.build("tiny", CORPUS, seed=3), Agent.build("tiny", CORPUS, seed=3)
    c = Agent.build("tiny", CORPUS, seed=4)
    assert 0.5e6 < a.num_params() < 1.5e6
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab() and len(a.tokenizer) <= 512
    sa, sb, sc = a.trainable_state(), b.trainable_state(), c.trainable_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    s = Agent.build("small", CORPUS, seed=0)
    assert 3e6 < s.num_params() < 7e6


def test_sample_shapes_and_masks(agent):
    torch.manual_seed(1)
    b = agent.sample(images(4), PROMPTS, max_new_tokens=48)
    B, P, G = 4, b.prompt_len, b.gen_ids.shape[1]
    assert b.input_ids.shape == b.attention_mask.shape == b.mm_token_type_ids.shape == (B, P + G)
    assert b.gen_mask.shape == b.thought_mask.shape == b.action_mask.shape == b.logp.shape == (B, G)
    assert b.values.shape == b.thought_entropy.shape == (B,) and b.image_grid_thw.shape == (B, 3)
    assert b.pixel_values.shape[0] == int(b.image_grid_thw.prod(-1).sum())
    assert torch.equal(b.thought_mask + b.action_mask, b.gen_mask)          # disjoint, cover gen_mask
    assert torch.equal(b.attention_mask[:, P:].float(), b.gen_mask)
    assert (b.mm_token_type_ids[:, P:] == 0).all() and (b.mm_token_type_ids[:, :P].sum(1) == 9).all()  # 3x3 tokens
    n = b.gen_mask.sum(1).long()
    assert torch.equal(b.gen_mask, (torch.arange(G) < n[:, None]).float())   # a prefix of ones
    assert (b.logp[b.gen_mask == 0] == 0).all() and (b.logp[b.gen_mask == 1] <= 0).all()
    for r in range(B):   # the SFT'd agent finishes with <|im_end|> and answers in JSON
        assert b.gen_ids[r, n[r] - 1] == agent.im_end_id and (b.gen_ids[r, n[r]:] == agent.pad_id).all()
        assert '"action":' in b.texts[r] and b.action_mask[r].sum() >= 2
    assert (b.thought_entropy > 0).all()


def test_thought_action_split_exact(agent):
    text = '{"thoughts": "first guess "action": left. no, move up.", "action": "up"}'
    none = '{"thoughts": "no key here"}'
    b = agent.encode(images(2), PROMPTS[:2], [text, none])
    tok = agent.tokenizer
    ids = b.gen_ids[0][b.gen_mask[0].bool()].tolist()
    s = text.rfind('"action":')                    # the LAST one, not the one inside the thought
    assert text.count('"action":') == 2 and s > text.find('"action":')
    spans = token_spans(tok, ids)
    k = next(i for i, (lo, hi) in enumerate(spans) if lo <= s < hi)   # token holding the quote
    assert torch.equal(b.thought_mask[0, :len(ids)], (torch.arange(len(ids)) < k).float())
    th = tok.decode(b.gen_ids[0][b.thought_mask[0].bool()])
    ac = tok.decode(b.gen_ids[0][b.action_mask[0].bool()], skip_special_tokens=True)
    assert th == text[:spans[k][0]] and ac == text[spans[k][0]:] and th + ac == text
    assert text[len(th):s].strip() == ""          # thought ends right before `"action":` (up to spacing)
    assert b.gen_ids[0, len(ids) - 1] == agent.im_end_id and b.action_mask[0, len(ids) - 1] == 1   # EOS is action
    assert b.texts[0] == text
    assert torch.equal(b.thought_mask[1], b.gen_mask[1]) and b.action_mask[1].sum() == 0   # no key: all thought
    t = agent.tokenize(images(2), PROMPTS[:2], [text, none])   # the same Batch without the forward
    assert torch.equal(t.input_ids, b.input_ids) and torch.equal(t.thought_mask, b.thought_mask)
    assert not t.logp.any() and not t.values.any() and not t.thought_entropy.any()
    with torch.no_grad():
        logp, values, _ = agent.score(t)
    assert torch.equal(logp, b.logp) and torch.equal(values, b.values)


def test_a_token_that_starts_exactly_at_the_action_key_is_action(agent):
    # the other case of the split above: no merge leftwards, the key's quote opens a token of its own
    tok, found = agent.tokenizer, 0
    for text in ('x\n"action":"up"', 'x "action": "up"', '{"thoughts":"a b"\n"action":"up"}', 'ok\n\n"action":"left"'):
        ids, s = tok.encode(text), text.rfind('"action":')
        starts = [lo for lo, _ in token_spans(tok, ids)]
        if s in starts:
            found += 1
            assert agent.split_thought_action(ids) == starts.index(s)
    assert found  # the tokenizer splits at least one of them there


def test_top_k_keeps_exactly_k_tokens(agent):
    # top-k 1 samples the argmax every time; top-k 2 both of the two best, never a third
    V, (best, second, third) = len(agent.tokenizer), [i for i in range(50, 60) if i not in agent.suppress_ids][:3]
    logits = torch.full((400, V), -5.0)
    logits[:, best], logits[:, second], logits[:, third] = 2.0, 1.9, 1.8
    seen = torch.zeros(400, V, dtype=torch.bool)
    torch.manual_seed(0)
    one = agent.next_tokens(logits, seen, 5, 1.0, 1, 1.0, True, 0)
    two = agent.next_tokens(logits, seen, 5, 1.0, 2, 1.0, True, 0)
    assert set(one.tolist()) == {best} and set(two.tolist()) == {best, second}


def test_score_equals_sample_logp(agent):
    # independent reference: generate's own per-step logits (KV-cache path) at the chosen tokens
    imgs, T = images(4), 0.7
    b = agent.sample(imgs, PROMPTS, temperature=T, do_sample=False, repetition_penalty=1.0, max_new_tokens=40)
    enc = agent.tokenize_prompts(imgs, PROMPTS)
    with torch.no_grad():
        out = agent.model.generate(**agent._model_inputs(enc), do_sample=False, max_new_tokens=40,
                                   return_dict_in_generate=True, output_logits=True,
                                   pad_token_id=agent.pad_id, eos_token_id=agent.eos_ids)
    G = b.gen_ids.shape[1]
    ref_logits = torch.stack(out.logits[:G], 1)                                 # [B, G, V]
    ref = torch.log_softmax(ref_logits / T, -1).gather(-1, b.gen_ids[..., None]).squeeze(-1) * b.gen_mask
    assert torch.equal(out.sequences[:, enc["input_ids"].shape[1]:][:, :G] * b.gen_mask.long(),
                       b.gen_ids * b.gen_mask.long())
    assert (ref - b.logp).abs().max() < 1e-4
    logp, values, logits = agent.score(b, return_logits=True)
    assert logp.requires_grad and values.requires_grad
    assert (logp - b.logp).abs().max() < 1e-4 and (values - b.values).abs().max() < 1e-5
    real = b.gen_mask.bool()   # after EOS generate feeds pads to finished rows; only real tokens compare
    assert (logits - ref_logits)[real].abs().max() < 1e-4                        # aligned to gen tokens
    lp2, _, _ = agent.score(b, temperature=1.0)
    ref1 = torch.log_softmax(ref_logits, -1).gather(-1, b.gen_ids[..., None]).squeeze(-1) * b.gen_mask
    assert (lp2 - ref1).abs().max() < 1e-4


def slow_decode(agent, imgs, prompts, n, **opts):
    """Reference sampler without a cache: a full forward over prompt + tokens so far for every new token,
    the same `next_tokens` rule. Returns gen ids [B, n] (pad after EOS)."""
    enc = agent.tokenize_prompts(imgs, prompts)
    B = len(prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    seen = torch.zeros(B, agent.model.config.text_config.vocab_size, dtype=torch.bool)
    for b in range(B):
        seen[b, ids[b][mask[b] > 0]] = True
    gen, done = [], torch.zeros(B, dtype=torch.bool)
    for g in range(n):
        x = dict(enc, input_ids=torch.cat([ids] + [t[:, None] for t in gen], 1),
                 attention_mask=torch.cat([mask, torch.ones(B, g, dtype=mask.dtype)], 1),
                 mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros(B, g, dtype=torch.long)], 1))
        with torch.no_grad():
            logits = agent.model(**agent._model_inputs(x)).logits[:, -1]
        tok = agent.next_tokens(logits, seen, g, **opts)
        tok = torch.where(done, torch.full_like(tok, agent.pad_id), tok)
        seen[torch.arange(B), tok] = True
        done |= torch.isin(tok, torch.tensor(agent.eos_ids))
        gen.append(tok)
    return torch.stack(gen, 1)


@pytest.mark.parametrize("lora", [False, True])
def test_kv_decoder_equals_slow_loop_and_full_forward(agent, lora, tmp_path):
    a = agent
    if lora:   # a saved and reloaded LoRA agent: the decoder calls the wrapped projections
        la = Agent.build("tiny", CORPUS, seed=0, lora_rank=4, lora_alpha=8)
        with torch.no_grad():
            for m in lora_modules(la.model).values():
                m.lora_B.normal_(0, 0.05)
        la.save(tmp_path / "lora")
        a = Agent.load(tmp_path / "lora")
    imgs = images(4, seed=11)
    opts = dict(temperature=1.3, top_k=20, repetition_penalty=1.2, do_sample=True, min_new_tokens=3)
    torch.manual_seed(5)
    b = a.sample(imgs, PROMPTS, max_new_tokens=30, **opts)
    torch.manual_seed(5)
    ref = slow_decode(a, imgs, PROMPTS, b.gen_ids.shape[1], **opts)
    real = b.gen_mask.bool()
    assert torch.equal(b.gen_ids[real], ref[real])      # same seed, same tokens
    assert b.gen_mask.sum(1).min() >= 3                  # min_new_tokens held EOS back
    # the decoding pass's numbers equal one full teacher-forced forward over the finished sequences
    with torch.no_grad():
        logp, values, logits = a.score(b, return_logits=True)
    assert (logp - b.logp).abs().max() < 1e-5 and (values - b.values).abs().max() < 1e-5
    lp = torch.log_softmax(logits / 1.3, -1)
    ent = -(lp.exp() * lp).sum(-1)
    full = (ent * b.thought_mask).sum(1) / b.thought_mask.sum(1).clamp(min=1)
    assert (full - b.thought_entropy).abs().max() < 1e-5
    # encode's entropy is the same sum, over the tokens of the answers it is given
    e = a.encode(imgs, PROMPTS, b.texts, temperature=1.3)
    with torch.no_grad():
        lp = torch.log_softmax(a.score(e, return_logits=True)[2] / 1.3, -1)
    ent = (-(lp.exp() * lp).sum(-1) * e.thought_mask).sum(1) / e.thought_mask.sum(1)
    assert (ent - e.thought_entropy).abs().max() < 1e-5 and (ent > 0).all()


def test_min_new_tokens_holds_eos_back_for_exactly_that_many_tokens(agent):
    V = agent.model.config.text_config.vocab_size
    logits = torch.zeros(1, V)
    logits[0, agent.eos_ids] = 5.0   # EOS is the argmax
    seen = torch.zeros(1, V, dtype=torch.bool)
    picks = [int(agent.next_tokens(logits, seen, step, 1.0, 0, 1.0, False, 2)) for step in range(4)]
    assert [t in agent.eos_ids for t in picks] == [False, False, True, True]


def test_kv_decoder_samples_like_generate(agent):
    """Same seed, same rules (repetition penalty, banned tokens, temperature, top-k): generate's tokens."""
    imgs, T = images(4, seed=3), 1.5
    torch.manual_seed(9)
    b = agent.sample(imgs, PROMPTS, temperature=T, top_k=30, repetition_penalty=1.3, max_new_tokens=30)
    enc = agent.tokenize_prompts(imgs, PROMPTS)
    torch.manual_seed(9)
    with torch.no_grad():
        out = agent.model.generate(**agent._model_inputs(enc), do_sample=True, temperature=T, top_k=30,
                                   top_p=1.0, repetition_penalty=1.3, max_new_tokens=30,
                                   suppress_tokens=agent.suppress_ids, pad_token_id=agent.pad_id,
                                   eos_token_id=agent.eos_ids)
    gen = out[:, enc["input_ids"].shape[1]:][:, :b.gen_ids.shape[1]]
    real = b.gen_mask.bool()
    assert torch.equal(gen[real], b.gen_ids[real])


@pytest.mark.parametrize("shapes", [[(96, 96, 3)] * 3, [(96, 96, 3), (128, 192, 3), (96, 96, 3)]])
def test_speed_up_changes_no_number(agent, shapes):
    """The linear patch embedding, the batched vision attention (images of one size; else its fallback) and
    eager attention give what transformers' own Conv3d, per-image attention and sdpa give, in fp32."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    imgs = [images(1, seed=i, shape=s)[0] for i, s in enumerate(shapes)]
    batch = agent.tokenize(imgs, PROMPTS[:3], ANSWERS[:3])
    slow = agent.copy_frozen()
    original = {fast: orig for orig, fast in agent_mod.FAST_CLASSES.items()}
    for m in slow.model.modules():   # back to the classes and attention transformers builds
        m.__class__ = original.get(type(m), type(m))
    slow.model.set_attn_implementation("sdpa")
    assert type(slow.model.model.visual.patch_embed) is qwen.Qwen2_5_VisionPatchEmbed
    with torch.no_grad():
        fast_out, slow_out = agent.score(batch, return_logits=True), slow.score(batch, return_logits=True)
    for f, s in zip(fast_out, slow_out):
        assert f.shape == s.shape and (f - s).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(96, 96, 3), (128, 192, 3), (64, 32, 3)])
def test_direct_encoding_equals_the_processor(agent, shape):
    """tokenize_prompts skips the processor's per-image PIL work: the same tensors, bit for bit; mixed sizes,
    and a size the processor would resize (not a multiple of 32 pixels), go through the processor itself."""
    from PIL import Image
    imgs, prompts = images(4, seed=3, shape=shape), [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[1] * 2]
    texts = [agent.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                              {"type": "text", "text": p}]}],
                                                 add_generation_prompt=True, tokenize=False) for p in prompts]
    ref = agent.processor(images=[[Image.fromarray(im)] for im in imgs], text=texts, return_tensors="pt", padding=True)
    assert agent.encode_direct(imgs, texts) is not None   # the direct path is the one tokenize_prompts takes
    enc = agent.tokenize_prompts(imgs, prompts)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert enc[key].dtype == ref[key].dtype and torch.equal(enc[key], ref[key]), key
    assert agent.encode_direct(imgs[:1] + images(1, shape=(96, 128, 3)), texts[:2]) is None
    assert agent.encode_direct(images(2, shape=(100, 96, 3)), texts[:2]) is None


def test_left_padding_invariance(agent):
    imgs = images(2, seed=5)
    alone = agent.encode(imgs[:1], PROMPTS[1:2], ANSWERS[:1])
    both = agent.encode(imgs, PROMPTS[1:2] + [PROMPTS[0] * 3], ANSWERS[:1] + [ANSWERS[2]])
    assert both.prompt_len > alone.prompt_len and both.attention_mask[0, 0] == 0   # row 0 is left-padded
    G = alone.gen_ids.shape[1]
    assert (both.logp[0, :G] - alone.logp[0]).abs().max() < 1e-5
    assert abs(both.values[0] - alone.values[0]) < 1e-5


def test_cat_and_select_keep_rows(agent):
    b1 = agent.encode(images(2, seed=1), PROMPTS[:2], ANSWERS[:2])
    b2 = agent.encode(images(3, seed=2), [PROMPTS[0] * 2, PROMPTS[2], PROMPTS[3]], ANSWERS[1:])
    assert b1.prompt_len != b2.prompt_len and b1.gen_ids.shape[1] != b2.gen_ids.shape[1]
    cat = Batch.cat([b1, b2])
    assert cat.input_ids.shape[0] == 5 and cat.texts == b1.texts + b2.texts
    logp, values, _ = agent.score(cat)
    for src, rows in ((b1, range(0, 2)), (b2, range(2, 5))):
        for i, r in enumerate(rows):
            G = src.gen_ids.shape[1]
            assert (logp[r, :G] - src.logp[i]).abs().max() < 1e-5 and (logp[r, G:] == 0).all()
            assert (cat.logp[r, :G] == src.logp[i]).all() and abs(values[r] - src.values[i]) < 1e-5
    sel = cat.select([4, 0, 2])
    assert torch.equal(sel.image_grid_thw, cat.image_grid_thw[[4, 0, 2]])
    n = int(b2.image_grid_thw[0].prod())   # all rows have the same patch count here
    assert torch.equal(sel.pixel_values[:n], b2.pixel_values[2 * n:3 * n])
    assert torch.equal(sel.pixel_values[n:2 * n], b1.pixel_values[:n])
    slp, sv, _ = agent.score(sel)
    assert (slp - logp[[4, 0, 2]]).abs().max() < 1e-5 and (sv - values[[4, 0, 2]]).abs().max() < 1e-5
    assert sel.texts == [cat.texts[i] for i in (4, 0, 2)]


def test_select_with_different_image_sizes(agent):
    a = agent.encode(images(1, shape=(96, 96, 3)), PROMPTS[:1], ANSWERS[:1])
    c = agent.encode(images(1, shape=(128, 192, 3)), PROMPTS[2:3], ANSWERS[2:3])   # card-game size
    cat = Batch.cat([a, c, a])
    assert cat.image_grid_thw[:, 1:].prod(-1).tolist() == [36, 96, 36]
    sel = cat.select([1])
    assert torch.equal(sel.pixel_values, c.pixel_values)
    assert (agent.score(sel)[0] - c.logp).abs().max() < 1e-5


def test_a_flipped_byte_in_a_weight_file_is_named_at_load(agent, tmp_path):
    agent.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest) == set(os.listdir(tmp_path / "a")) - {"manifest.json"}   # every file, itself not
    assert {"model.safetensors", "value_head.safetensors", "config.json", "agent.json"} <= set(manifest)
    weights = tmp_path / "a" / "value_head.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == "0o644"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the header check alone would pass
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"value_head.safetensors is damaged: its SHA-256 differs"):
        Agent.load(tmp_path / "a")


def test_manifest_covers_nested_directories(tmp_path):
    """A checkpoint holding agent directories: one manifest over every file, the agents' own hashes reused."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "w.bin").write_bytes(b"weights")
    (tmp_path / "state.pt").write_bytes(b"state")
    write_manifest(tmp_path / "agent")
    (tmp_path / "agent" / "w.bin").write_bytes(b"changed")   # a stale nested hash is taken as is
    write_manifest(tmp_path)
    top = json.loads((tmp_path / "manifest.json").read_text())
    inner = json.loads((tmp_path / "agent" / "manifest.json").read_text())
    assert list(top) == ["agent/manifest.json", "agent/w.bin", "state.pt"] and top["agent/w.bin"] == inner["w.bin"]
    with pytest.raises(CheckpointError, match=r"agent/w.bin is damaged"):
        verify_manifest(tmp_path)
    nested = (tmp_path / "agent" / "manifest.json").read_text()
    (tmp_path / "agent" / "manifest.json").write_text(nested.replace(inner["w.bin"], "0" * 64))
    with pytest.raises(CheckpointError, match=r"agent/manifest.json is damaged"):   # the outer check names it
        verify_manifest(tmp_path)
    (tmp_path / "agent" / "manifest.json").write_text(nested)
    (tmp_path / "state.pt").unlink()
    (tmp_path / "agent" / "w.bin").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match=r"state.pt is missing \(listed in .*manifest.json\)"):
        verify_manifest(tmp_path)
    verify_manifest(tmp_path / "agent")   # the nested manifest holds on its own


def test_save_load_roundtrip(agent, tmp_path):
    b = agent.encode(images(2), PROMPTS[:2], ANSWERS[:2])
    with torch.no_grad():
        agent.value_head[-1].bias.fill_(0.25)   # non-trivial value head to round-trip
        lp, v, lg = agent.score(b, return_logits=True)
    path = tmp_path / "ckpt"
    agent.save(path)
    agent.save(path)                            # replacing an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]   # no temp or .old dirs left behind
    back = Agent.load(path)
    assert back.size == "tiny" and back.value_hidden == agent.value_hidden
    b2 = back.encode(images(2), PROMPTS[:2], ANSWERS[:2])
    assert torch.equal(b2.input_ids, b.input_ids)
    with torch.no_grad():
        lp2, v2, lg2 = back.score(b2, return_logits=True)
    assert torch.equal(lg, lg2) and torch.equal(lp, lp2) and torch.equal(v, v2)
    with torch.no_grad():
        agent.value_head[-1].bias.zero_()


def test_plain_save_pretrained_loads(agent, tmp_path):
    agent.model.save_pretrained(tmp_path)
    agent.processor.save_pretrained(tmp_path)
    back = Agent.load(tmp_path)
    b = agent.encode(images(2), PROMPTS[:2], ANSWERS[:2])
    with torch.no_grad():
        lg = agent.score(b, return_logits=True)[2]
        lp2, v2, lg2 = back.score(b, return_logits=True)
    assert torch.equal(lg, lg2) and (v2 == 0).all()   # fresh value head: zero last layer


def shorten(f, keep):
    f.write_bytes(f.read_bytes()[:keep])


def set_config(d, **kw):
    (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()), **kw)))


# damage done to a freshly saved agent -> the one CheckpointError line Agent.load must give
DAMAGES = {
    "truncated weights": (lambda d: shorten(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
                          r"model.safetensors is truncated or corrupt"),
    "corrupt header": (lambda d: (d / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......" + (d / "model.safetensors").read_bytes()[100:]),
                       r"model.safetensors is truncated or corrupt"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), r"model.safetensors is missing"),
    "truncated value head": (lambda d: shorten(d / "value_head.safetensors", -3),
                             r"value_head.safetensors is truncated"),
    # no manifest: the shape check on load still names a head of another agent
    "foreign value head": (lambda d: ((d / "manifest.json").unlink(),
                                      save_file({"0.weight": torch.zeros(3, 3)}, str(d / "value_head.safetensors"))),
                           r"value_head.safetensors does not fit this agent"),
    # no manifest: a saved agent (it has agent.json) without its value head is an error, not V = 0
    "no value head": (lambda d: ((d / "manifest.json").unlink(), (d / "value_head.safetensors").unlink()),
                      r"value_head.safetensors is missing"),
    "agent.json of wrong types": (lambda d: ((d / "manifest.json").unlink(),
                                             (d / "agent.json").write_text('{"size": "tiny", "lora_rank": "4x"}')),
                                  r"agent.json is damaged \(lora_rank = '4x'\)"),
    "no config": (lambda d: (d / "config.json").unlink(), r"config.json is missing, so .* is not a transformers"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             r"config.json is damaged \(a JSON list, not an object\)"),
    "another model type": (lambda d: set_config(d, model_type="llama"),
                           r"config.json: model_type 'llama' is not a Qwen2.5-VL"),
    "no tokenizer": (lambda d: (d / "tokenizer_config.json").unlink(), r"tokenizer_config.json is missing"),
    "manifest mismatch": (lambda d: (d / "agent.json").write_text((d / "agent.json").read_text() + " "),
                          r"agent.json is damaged: its SHA-256 differs"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_checkpoints_raise(agent, tmp_path, damage):
    path = tmp_path / "ckpt"
    agent.save(path)
    hurt, message = DAMAGES[damage]
    hurt(path)
    with pytest.raises(CheckpointError, match=message) as e:
        Agent.load(path)
    assert str(path) in str(e.value)   # names the file


def test_missing_checkpoints_raise(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint directory$"):
        Agent.load(tmp_path / "missing")
    (tmp_path / ".missing.old").mkdir()   # what a save interrupted between its two renames leaves
    with pytest.raises(CheckpointError, match=r"interrupted save left the previous copy at .*\.missing\.old"):
        Agent.load(tmp_path / "missing")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no network retries here
    with pytest.raises(CheckpointError, match="hub"):
        Agent.load("nobody-here/no-such-model")
    monkeypatch.chdir(tmp_path)   # runs/x has the shape of a hub id, but with runs/ here it is a path
    (tmp_path / "runs" / ".x.old").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"runs/x: no such checkpoint directory \(an interrupted save"):
        Agent.load("runs/x")


@pytest.mark.parametrize("text, message", [("{not json", "not readable JSON"), ("", "not readable JSON"),
                                           ("[1, 2]", r"a JSON list, not an object"), ("3", "a JSON int")])
def test_read_json_wants_an_object(tmp_path, text, message):
    f = tmp_path / "x.json"
    f.write_text(text)
    with pytest.raises(CheckpointError, match=f"x.json is damaged \\({message}"):
        read_json(f)
    f.write_text('{"a": [1]}')
    assert read_json(f) == {"a": [1]}


def test_lora_layer_by_hand():
    # rank 2, alpha 8: scale 4. A, B all ones, x all ones: B A x = 2 * 4 = 8 per output, times 4 = 32 over the base
    m = agent_mod.LoRALinear(torch.nn.Linear(4, 3), rank=2, alpha=8)
    with torch.no_grad():
        m.lora_A.fill_(1.0), m.lora_B.fill_(1.0)
    x = torch.ones(1, 4)
    assert torch.allclose(m(x) - m.base(x), torch.full((1, 3), 32.0))
    assert torch.equal(m.delta_weight(), torch.full((3, 4), 8.0))
    # a loaded state replaces B A: the effective weight is base + delta, 4 * 0.5 = 2 over the base
    m.set_delta(torch.full((3, 4), 0.5))
    assert torch.equal(m.delta_weight(), torch.full((3, 4), 0.5))
    assert torch.allclose(m(x) - m.base(x), torch.full((1, 3), 2.0))


def test_trainable_state_is_a_copy(agent):
    # the states the merge keeps after each epoch must not move with the weights that go on training
    state, (name, p) = agent.trainable_state(), next(iter(agent.model.named_parameters()))
    kept = state[name].clone()
    with torch.no_grad():
        p.add_(1.0)
    try:
        assert torch.equal(state[name], kept)
    finally:
        with torch.no_grad():
            p.sub_(1.0)


def test_lora(agent, tmp_path):
    base = agent.copy_frozen()
    la = Agent.build("tiny", CORPUS, seed=0, lora_rank=4, lora_alpha=8)
    # start from the SFT'd agent's weights: copy them into the LoRA model's frozen bases
    mods = lora_modules(la.model)
    assert len(mods) == 2 * 7 + 1 * 5 + 2   # text layer: q,k,v,o,gate,up,down; vision: qkv,proj,gate,up,down; merger 2
    assert all(not n.endswith("lm_head") for n in mods)
    sd = agent.model.state_dict()
    with torch.no_grad():
        for n, p in la.model.named_parameters():
            if "lora_" not in n:
                p.copy_(sd[n.replace(".base.", ".")])
    b = agent.encode(images(2), PROMPTS[:2], ANSWERS[:2])
    with torch.no_grad():
        lg0, lgl = base.score(b, return_logits=True)[2], la.score(b, return_logits=True)[2]
    assert torch.equal(lg0, lgl)                       # B = 0: wrapped model equals the base
    # gradients reach only LoRA factors (and the value head, which is separate)
    logp, values, _ = la.score(b)
    (-(logp.sum()) + values.sum()).backward()
    for n, p in la.model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
        if "lora_" in n:
            assert p.grad is not None
    assert all(m.lora_A.grad.abs().sum() == 0 for m in mods.values())   # B = 0 at init, so dL/dA = 0
    assert any(m.lora_B.grad.abs().sum() > 0 for m in mods.values())
    params, head = la.parameters(), list(la.value_head.parameters())
    assert all(p is q for p, q in zip(params[-len(head):], head))   # the body's trainable tensors, then the head
    assert all("lora_" in n for n, p in la.model.named_parameters() if any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=1e-2)
    opt.step()
    # trainable_state = real weight change after folding LoRA in
    state = la.trainable_state()
    assert set(state) == {f"{n}.weight" for n in mods}
    with torch.no_grad():
        for n, m in mods.items():
            x = torch.randn(3, m.base.in_features)
            folded = sd[f"{n}.weight"] + (m.lora_B @ m.lora_A) * m.scale
            assert torch.allclose(state[f"{n}.weight"], folded - sd[f"{n}.weight"], atol=1e-7)
            assert torch.allclose(m(x), torch.nn.functional.linear(x, folded, m.base.bias), atol=1e-5)
        lg_trained = la.score(b, return_logits=True)[2]
    assert (lg_trained - lg0).abs().max() > 1e-4      # the step changed the model
    # a frozen teacher from the untrained LoRA agent reproduces the trained outputs from the state alone
    teacher = Agent.build("tiny", CORPUS, seed=0, lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in teacher.model.named_parameters():
            if "lora_" not in n:
                p.copy_(sd[n.replace(".base.", ".")])
    teacher = teacher.copy_frozen()
    teacher.load_trainable_state(state)
    with torch.no_grad():
        lg_t = teacher.score(b, return_logits=True)[2]
    assert (lg_t - lg_trained).abs().max() < 1e-4
    assert all(torch.allclose(v, state[k], atol=1e-7) for k, v in teacher.trainable_state().items())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    # save/load restores the LoRA settings and factors (the saved model itself is the plain base)
    la.save(tmp_path / "lora")
    back = Agent.load(tmp_path / "lora")
    assert back.lora_rank == 4 and back.lora_alpha == 8 and len(lora_modules(back.model)) == len(mods)
    with torch.no_grad():
        assert torch.equal(back.score(b, return_logits=True)[2], lg_trained)
    (tmp_path / "lora" / "manifest.json").unlink()
    (tmp_path / "lora" / "lora.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lora.safetensors is missing"):
        Agent.load(tmp_path / "lora")


def test_full_trainable_state_roundtrip(agent):
    teacher = Agent.build("tiny", CORPUS, seed=9).copy_frozen()
    teacher.load_trainable_state(agent.trainable_state())
    b = agent.encode(images(1), PROMPTS[:1], ANSWERS[:1])
    with torch.no_grad():
        assert torch.equal(agent.score(b, return_logits=True)[2], teacher.score(b, return_logits=True)[2])
    with pytest.raises(KeyError):
        teacher.load_trainable_state({"nope": torch.zeros(1)})


def test_seeded_sampling_reproducible(agent):
    imgs = images(4, seed=7)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(agent.sample(imgs, PROMPTS, temperature=1.5, top_k=50, max_new_tokens=24))
    assert runs[0].texts == runs[1].texts and torch.equal(runs[0].input_ids, runs[1].input_ids)
    torch.manual_seed(124)
    other = agent.sample(imgs, PROMPTS, temperature=1.5, top_k=50, max_new_tokens=24)
    assert other.texts != runs[0].texts


def test_bad_input_is_a_clear_error(agent):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        agent.sample([np.zeros((96, 96), np.uint8)], PROMPTS[:1])
    with pytest.raises(ValueError, match="as many images"):
        agent.sample(images(2), PROMPTS[:1])
