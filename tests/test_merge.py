"""merge.py against numbers worked out by hand (docs/method.md 4.1)."""
import os
import sys

import pytest
import torch

from merge import MergeHistory, linear_merge, linear_tensor, ties_merge, ties_tensor, trim

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

T = torch.tensor


def close(a, b, atol=1e-6):
    return torch.allclose(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=atol)


def test_ties_hand_example():
    # density 0.75 on 4 entries -> keep k = 3 per delta; weights 1, 1, 2
    d1 = {"w": T([4.0, -1.0, 0.5, 3.0]), "b": T([2.0, 0.0])}
    d2 = {"w": T([-2.0, 5.0, -1.0, 0.25]), "b": T([-2.0, 0.0])}
    d3 = {"w": T([1.0, -3.0, 2.0, -0.5]), "b": T([0.0, 0.0])}
    # trimmed: d1 [4,-1,0,3]  d2 [-2,5,-1,0]  d3 [1,-3,2,0]
    # weighted sums: 4-2+2=4 (+), -1+5-6=-2 (-), 0-1+4=3 (+), 3 (+)
    # disjoint means: (4*1+1*2)/3=2, (-1*1-3*2)/3=-7/3, 2*2/2=2, 3/1=3
    # "b": k = max(1, floor(1.5)) = 1: [2,0], [-2,0], [0,0]; sums 0 and 0 -> both "+"
    #      entry 0 keeps d1's 2 -> 2; entry 1 keeps nothing (zeros are never kept) -> 0
    out = ties_merge([d1, d2, d3], [1.0, 1.0, 2.0], density=0.75)
    assert close(out["w"], [2.0, -7 / 3, 2.0, 3.0])
    assert close(out["b"], [2.0, 0.0])


def test_trim_keeps_exactly_k_and_breaks_ties_by_index():
    assert torch.equal(trim(T([1.0, -1.0, 1.0, 1.0]), 0.5), T([1.0, -1.0, 0.0, 0.0]))
    assert torch.equal(trim(T([0.1, -5.0, 3.0]), 0.01), T([0.0, -5.0, 0.0]))  # k = max(1, 0) = 1
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    assert int((trim(x, 0.29) != 0).sum()) == 26  # floor(0.29 * 91) = 26


def test_ties_simple_identities():
    g = torch.Generator().manual_seed(1)
    d = {"a": torch.randn(5, 6, generator=g), "b": torch.randn(7, generator=g)}
    one = ties_merge([d], [3.0], density=1.0)
    same = ties_merge([d, d, d], [1.0, 2.0, 0.5], density=0.6)
    for k in d:
        assert close(one[k], d[k])  # one delta at density 1 returns it (up to w * x / w rounding)
        assert close(same[k], trim(d[k], 0.6))  # identical deltas return themselves (trimmed)
    # no sign conflicts and density 1: TIES is the weighted mean
    pos = [{"a": torch.rand(4, 4, generator=g) + 0.1} for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    assert close(ties_merge(pos, w, density=1.0)["a"], linear_merge(pos, w)["a"])
    assert close(linear_merge(pos, w)["a"], sum(wi * p["a"] for wi, p in zip(w, pos)) / 8)


def test_bf16_in_bf16_out_and_bad_input():
    d = [{"a": torch.randn(8, 8).bfloat16()} for _ in range(2)]
    out = ties_merge(d, [1.0, 1.0])
    assert out["a"].dtype == torch.bfloat16
    base = {"a": torch.randn(8, 8).bfloat16()}
    h = MergeHistory(base)
    h.add([{"a": base["a"] + x["a"]} for x in d])
    assert h.teacher_state()["a"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weights"):
        ties_merge(d, [1.0])
    with pytest.raises(ValueError, match="> 0"):
        ties_merge(d, [1.0, -1.0])
    with pytest.raises(ValueError, match="shape"):
        ties_merge([d[0], {"a": torch.zeros(8, 9)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="keys"):
        h.add([{"b": torch.zeros(8, 8)}])
    with pytest.raises(ValueError, match="shape"):
        h.add([{"a": torch.zeros(8, 9)}])
    assert h.count == 2  # a rejected add changes nothing
    for members in ([T([1.0]), T([2.0]), T([3.0])], (x for x in [T([1.0])])):  # one tensor too many or too few
        for merge in (lambda m, w: ties_tensor(m, w, 1.0), linear_tensor):
            with pytest.raises(ValueError, match="zip"):
                merge(iter(members), [1.0, 1.0])


# base 10; deltas d1 = [2, 1], d2 = [4, -1], d3 = [1, 3]
BASE = {"x": T([10.0, 10.0])}
STATES = [{"x": T([12.0, 11.0])}, {"x": T([14.0, 9.0])}, {"x": T([11.0, 13.0])}]


@pytest.mark.parametrize("mode,method,alpha,expected", [
    # SMA linear: [2,1] -> [3,0] -> (2*[3,0] + [1,3]) / 3
    ("sma", "linear", 0.5, [[2, 1], [3, 0], [7 / 3, 1]]),
    # SMA TIES (density 1): second entry of add 2: 1 - 1 = 0 -> "+", keeps 1 -> 1;
    # add 3: members [3,1] (weight 2) and [1,3]: (6+1)/3, (2+3)/3
    ("sma", "ties", 0.5, [[2, 1], [3, 1], [7 / 3, 5 / 3]]),
    # EMA linear alpha 0.25: .25*[4,-1] + .75*[2,1] = [2.5,.5]; .25*[1,3] + .75*[2.5,.5] = [2.125,1.125]
    ("ema", "linear", 0.25, [[2, 1], [2.5, 0.5], [2.125, 1.125]]),
    # EMA TIES alpha 0.25: entry 1 of step 2: .75 - .25 > 0 -> keeps 1 (weight .75) -> 1;
    # step 3: (.75*2.5 + .25*1) / 1 = 2.125, (.75*1 + .25*3) / 1 = 1.5
    ("ema", "ties", 0.25, [[2, 1], [2.5, 1], [2.125, 1.5]]),
])
def test_history_arithmetic_over_three_adds(mode, method, alpha, expected):
    h = MergeHistory(BASE, mode=mode, method=method, alpha=alpha, density=1.0)
    assert torch.equal(h.teacher_state()["x"], BASE["x"])  # base itself before any add
    for k, (s, e) in enumerate(zip(STATES, expected), 1):
        h.add([s])
        assert h.count == k
        assert close(h.teacher_state()["x"], T(e) + 10)


def test_sma_one_add_of_several_equals_ties_merge():
    h = MergeHistory(BASE, density=0.5)
    h.add(STATES)
    deltas = [{"x": s["x"] - BASE["x"]} for s in STATES]
    assert close(h.teacher_state()["x"], ties_merge(deltas, [1, 1, 1], density=0.5)["x"] + 10)


def test_running_merge_is_not_one_ties_over_the_history():
    # density 0.5 on 2 entries -> keep 1 per delta. base 0, deltas d1 [3,1], d2 [1,2], d3 [1,.5]
    base = {"x": T([0.0, 0.0])}
    states = [{"x": T([3.0, 1.0])}, {"x": T([1.0, 2.0])}, {"x": T([1.0, 0.5])}]
    h = MergeHistory(base, density=0.5)
    h.add(states[:2])  # one add is one TIES: [3,0] and [0,2] -> [3,2]
    assert close(h.teacher_state()["x"], [3.0, 2.0])
    h.add(states[2:])
    # running: the merge [3,2] (weight 2) is re-trimmed to [3,0]; d3 -> [1,0]: [(2*3+1)/3, 0]
    assert close(h.teacher_state()["x"], [7 / 3, 0.0])
    ema = MergeHistory(base, mode="ema", alpha=0.5, density=0.5)
    ema.add(states[:1])  # EMA's first merge is trim(d1) too: [3,0], not d1 itself
    assert close(ema.teacher_state()["x"], [3.0, 0.0])
    # one TIES over all three: [3,0], [0,2], [1,0] -> [(3+1)/2, 2/1]
    assert close(ties_merge(states, [1, 1, 1], density=0.5)["x"], [2.0, 2.0])


def test_bench_exact_merge_streams_the_same_ties_from_files(tmp_path):
    from bench_merge import exact_ties_merge, save_tensors
    base = {"x": T([10.0, 10.0]), "y": T([[1.0, -1.0]]).bfloat16()}
    states = [{"x": T([13.0, 11.0]), "y": T([[2.0, 0.0]]).bfloat16()},
              {"x": T([11.0, 12.0]), "y": T([[0.5, -3.0]]).bfloat16()},
              {"x": T([11.0, 10.5]), "y": T([[1.0, 1.0]]).bfloat16()}]
    paths = [tmp_path / f"ckpt{i}.safetensors" for i in range(3)]
    for s, p in zip(states, paths):
        save_tensors(s, p)
    assert sorted(os.listdir(tmp_path)) == [p.name for p in paths]  # no temp file left behind
    out = exact_ties_merge(paths, base, density=0.5)
    deltas = [{k: v.float() - base[k].float() for k, v in s.items()} for s in states]
    want = ties_merge(deltas, [1, 1, 1], density=0.5)
    assert close(out["x"], [12.0, 12.0]) and close(out["x"], want["x"] + base["x"])
    assert out["y"].dtype == torch.bfloat16 and close(out["y"], want["y"] + base["y"].float(), atol=1e-2)
    paths[1].write_bytes(paths[1].read_bytes()[:40])  # truncated: the error names the file
    with pytest.raises(ValueError, match="ckpt1.safetensors"):
        exact_ties_merge(paths, base)


def test_state_dict_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(4, 3, generator=g).bfloat16(), "v": torch.randn(5, generator=g)}
    h = MergeHistory(base, mode="ema", alpha=0.3, density=0.7)
    path = tmp_path / "state.pt"
    for adds in range(3):  # before any add (merged is None), then after one and two
        torch.save(h.state_dict(), path)  # as train.py saves it inside its checkpoint
        h2 = MergeHistory(base, mode="ema", alpha=0.3, density=0.7)
        h2.load_state_dict(torch.load(path, weights_only=False))
        assert h2.count == adds and (h2.merged is None) == (adds == 0)
        for k in base:
            assert torch.equal(h2.teacher_state()[k], h.teacher_state()[k])
            assert h2.teacher_state()[k].dtype == base[k].dtype
        h.add([{k: v + torch.randn(v.shape, generator=g).to(v.dtype) for k, v in base.items()}])
    nxt = {k: v + 1 for k, v in base.items()}
    snapshot, teacher = h.state_dict(), h.teacher_state()
    h.add([nxt])  # a state_dict held across an add still restores the history it was taken from
    h2.load_state_dict(snapshot)
    assert h2.count == 3 and all(torch.equal(h2.teacher_state()[k], teacher[k]) for k in base)
    h2.add([nxt])  # and it keeps merging identically
    assert all(torch.equal(h2.merged[k], h.merged[k]) for k in base)
    with pytest.raises(ValueError, match="settings"):
        MergeHistory(base, mode="sma").load_state_dict(h.state_dict())
    with pytest.raises(ValueError, match="shape"):
        h2.load_state_dict({**h.state_dict(), "base": {"w": torch.zeros(4, 4), "v": base["v"]}})


def test_ties_matches_a_direct_stacked_implementation():
    # the textbook form (stack, top-k mask, elect, disjoint mean) against the one-pass accumulators
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(5, 40, 30, generator=g)
    w = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5])
    k = int(0.7 * 1200)
    idx = xs.flatten(1).abs().topk(k, dim=1).indices
    trimmed = torch.zeros(5, 1200).scatter(1, idx, xs.flatten(1).gather(1, idx)).view_as(xs)
    sign = torch.where((w[:, None, None] * trimmed).sum(0) >= 0, 1.0, -1.0)
    kept = torch.where(torch.sign(trimmed) == sign, trimmed, torch.zeros(()))
    den = (w[:, None, None] * (kept != 0)).sum(0)
    want = torch.where(den > 0, (w[:, None, None] * kept).sum(0) / den.clamp_min(1e-12), torch.zeros(()))
    got = ties_merge([{"a": x} for x in xs], w.tolist(), density=0.7)["a"]
    assert torch.allclose(got, want, atol=1e-6)
