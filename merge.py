"""merge.py: the free teacher of GTR-Turbo, built by merging the agent's own checkpoints.

Implements docs/method.md section 4.1:
- task vectors `tau_i = theta_i - theta_0`, relative to the SFT-initialised weights theta_0;
- `ties_merge`: TIES (trim each tau to its top `density` fraction by magnitude, elect a sign per entry from
  the weighted sum, disjoint weighted mean over the entries that agree); `linear_merge` for the ablation;
- `MergeHistory`: theta_0 plus a *running* merge carried forward update after update (SMA or EMA over the
  history), so `theta_teacher = theta_0 + tau_merged` costs O(model) memory however many checkpoints
  have been folded in.

How TIES is computed here (one pass, O(one tensor) extra memory): after trimming, the entries that agree
with the elected sign are exactly the positive ones (elected +) or the negative ones (elected -), so it is
enough to accumulate, per entry, P = sum_i w_i max(t_i, 0), N = sum_i w_i min(t_i, 0) and the weights
W+ / W- of the strictly positive / negative entries. Elected sign = sign(P + N) (0 counts as +), and the
merged value is P / W+ or N / W- (0 where that weight is 0). So the members can come from a generator,
one at a time, and no stack of all members is ever built.

Left out on purpose: per-tensor densities, DARE-style random dropping, rescaling after the trim, windows
over the history (the paper uses all of it), and any knowledge of LoRA: for a LoRA agent the trainable
"state" is already the effective delta `B @ A * scale` with base zeros (see agent.py). One TIES over every
checkpoint kept on disk, streamed from files, is in scripts/bench_merge.py (`exact_ties_merge`).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]  # {parameter name: tensor}, a trainable state or a task vector


# ----------------------------------------------------------------------------------------------------
# TIES on one tensor


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep exactly k = max(1, floor(density * numel)) entries of largest magnitude.

    Ties at the threshold magnitude are broken by flat index (lowest first), so the result is
    deterministic. A threshold of 0 needs no tie-break: kept zeros and dropped zeros are the same.
    """
    n = x.numel()
    k = max(1, math.floor(density * n + 1e-9))  # 1e-9: 0.29 * 100 is 28.999... in floats
    if k >= n:
        return x
    a = x.abs().flatten()
    thr = a.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = a > thr  # fewer than k entries
    if thr > 0:  # one sync per tensor, not per entry
        tie = a == thr
        need = k - int(keep.sum())
        if int(tie.sum()) > need:
            tie &= tie.cumsum(0) <= need  # first `need` tied entries by index
        keep |= tie
    return torch.where(keep.view_as(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def ties_tensor(members: Iterable[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES over the task vectors of one tensor (trim, elect, disjoint mean), in fp32.

    `members` may be a generator (read one at a time), one per weight (else ValueError); see the module docstring
    for why four accumulators of the tensor's shape are enough.
    """
    pos = neg = wpos = wneg = None
    for x, w in zip(members, weights, strict=True):
        t = trim(x.float(), density)  # fp32 whatever the storage dtype
        if pos is None:
            pos, neg = torch.zeros_like(t), torch.zeros_like(t)
            wpos, wneg = torch.zeros_like(t), torch.zeros_like(t)
        pos.add_(t.clamp_min(0), alpha=w)
        neg.add_(t.clamp_max(0), alpha=w)
        wpos.add_((t > 0).float(), alpha=w)
        wneg.add_((t < 0).float(), alpha=w)
    plus = (pos + neg) >= 0  # elected sign of sum_i w_i t_i; zero counts as +
    num = torch.where(plus, pos, neg)
    den = torch.where(plus, wpos, wneg)
    # where nothing agrees (den == 0) num is 0 too: the merged entry is 0
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def linear_tensor(members: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean sum_i w_i x_i / sum_i w_i over the task vectors of one tensor, in fp32."""
    acc = None
    for x, w in zip(members, weights, strict=True):
        acc = x.float() * w if acc is None else acc.add_(x.float(), alpha=w)
    return acc / sum(weights)


# ----------------------------------------------------------------------------------------------------
# merges of whole task vectors {name: tensor}


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{n} deltas but {len(weights)} weights")
    if n == 0:
        raise ValueError("nothing to merge: empty list of deltas")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"merge weights must be finite and > 0, got {weights}")
    return weights


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


def _check_state(state: State, reference: State, what: str) -> None:
    """Same keys as `reference`, and every tensor a float tensor of the reference's shape."""
    if set(state.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(state.keys()))[:5]
        extra = sorted(set(state.keys()) - set(reference.keys()))[:5]
        raise ValueError(f"{what}: keys differ from the base (missing {missing}, unexpected {extra})")
    for name, ref in reference.items():
        x = state[name]
        if x.shape != ref.shape:
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what}: tensor {name!r} has dtype {x.dtype}; only floating tensors can be merged")


def _merge_dicts(deltas: Sequence[State], weights, merge_one) -> dict[str, torch.Tensor]:
    weights = _check_weights(weights, len(deltas))
    for i, d in enumerate(deltas):
        _check_state(d, deltas[0], f"delta {i}")
    # tensor by tensor: peak extra memory is a few copies of one tensor
    return {name: merge_one([d[name] for d in deltas], weights).to(ref.dtype) for name, ref in deltas[0].items()}


def ties_merge(deltas: Sequence[State], weights: Sequence[float], density: float = 0.8) -> dict[str, torch.Tensor]:
    """TIES merge of task vectors (docs/method.md 4.1). deltas: list of {name: tensor}, same keys and shapes.

    Per tensor: trim each delta to its top k = max(1, floor(density * numel)) magnitudes; elect the sign of
    sum_i w_i trimmed_i (0 -> +); result = sum_i w_i kept_i / sum_i w_i [kept_i != 0] over the entries
    whose sign equals the elected one (0 where none does). fp32 inside, returned in deltas[0]'s dtypes.
    """
    _check_density(density)
    return _merge_dicts(deltas, weights, lambda xs, ws: ties_tensor(xs, ws, density))


def linear_merge(deltas: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean sum_i w_i delta_i / sum_i w_i (the "linear" ablation of 4.1)."""
    return _merge_dicts(deltas, weights, linear_tensor)


# ----------------------------------------------------------------------------------------------------
# the running merge over the checkpoint history


class MergeHistory:
    """Base weights theta_0 and a running merged task vector over all checkpoints added so far.

    mode="sma" (simple moving average): every checkpoint has weight 1. `add(states)` makes ONE merge whose
    members are the running merge, with weight `count` (the number of checkpoints it already holds), and
    each new checkpoint's task vector, with weight 1:  merged <- merge([merged, tau_1..tau_m], [count, 1..1]).
    The first add has no running member: merged <- merge([tau_1..tau_m], [1..1]).

    mode="ema": the new checkpoints are folded in one at a time, in the given order:
        merged_1 = merge([tau_1], [1])                     (the very first checkpoint ever; = trim(tau_1)
                                                             for TIES, tau_1 for linear)
        merged_k = merge([merged_(k-1), tau_k], [1 - alpha, alpha])
    With method="linear" this is exactly merged_k = alpha tau_k + (1 - alpha) merged_(k-1) (docs/method.md 4.1);
    with "ties" the same two weights go into TIES (where only one side survives the trim/sign election,
    the disjoint mean takes its value unscaled).

    With TIES the running merge is not one TIES over the whole history (after the first add they differ in
    general): the running merge is re-trimmed at every add, so an entry a later trim drops is gone for good,
    and each of its entries votes with weight `count` even where fewer checkpoints agreed on it.
    tests/test_merge.py::test_running_merge_is_not_one_ties_over_the_history works a case out by hand.

    method: "ties" (default, `density` 0.8) or "linear". The merged task vector is kept in fp32 on the base's
    device; memory is O(model) however many checkpoints are added. `count` = checkpoints folded in.
    """

    def __init__(self, base: State, mode: str = "sma", alpha: float = 0.5, method: str = "ties",
                 density: float = 0.8):
        if mode not in ("sma", "ema"):
            raise ValueError(f"mode must be 'sma' or 'ema', got {mode!r}")
        if method not in ("ties", "linear"):
            raise ValueError(f"method must be 'ties' or 'linear', got {method!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        _check_density(density)
        if not base:
            raise ValueError("base state is empty")
        _check_state(base, base, "base")
        self.mode, self.alpha, self.method, self.density = mode, float(alpha), method, float(density)
        self.base = {k: v.detach().clone() for k, v in base.items()}  # own copy: the model keeps training
        self.merged: dict[str, torch.Tensor] | None = None  # fp32 task vectors, None before the first add
        self.count = 0

    def _merge(self, members, weights) -> torch.Tensor:
        if self.method == "ties":
            return ties_tensor(members, weights, self.density)
        return linear_tensor(members, weights)

    def _tau(self, state: State, name: str) -> torch.Tensor:
        """tau = theta - theta_0 for one tensor, fp32 on the base's device."""
        b = self.base[name]
        return state[name].to(device=b.device, dtype=torch.float32) - b.float()

    def add(self, states: State | Sequence[State]) -> None:
        """Fold in the checkpoints of one update (e.g. one per PPO epoch), in order.

        states: a list of full trainable states (dicts with the base's keys); a single dict is a list of one.
        Keys, shapes and dtypes are all checked before anything changes.
        """
        if isinstance(states, Mapping):
            states = [states]
        states = list(states)
        if not states:
            raise ValueError("add() needs at least one checkpoint")
        for i, s in enumerate(states):
            _check_state(s, self.base, f"checkpoint {i}")
        if self.mode == "sma":
            self._add_sma(states)
        else:
            for s in states:
                self._add_ema(s)

    def _add_sma(self, states: list[State]) -> None:
        merged = {}
        weights = ([float(self.count)] if self.merged is not None else []) + [1.0] * len(states)
        for name in self.base:
            running = [] if self.merged is None else [self.merged[name]]
            taus = (self._tau(s, name) for s in states)  # one fp32 copy at a time, not m of them
            merged[name] = self._merge(itertools.chain(running, taus), weights)
            if self.merged is not None:
                self.merged[name] = merged[name]  # drop the old tensor now, not after the loop
        self.merged = merged
        self.count += len(states)

    def _add_ema(self, state: State) -> None:
        merged = {}
        for name in self.base:
            tau = self._tau(state, name)
            if self.merged is None:
                merged[name] = self._merge([tau], [1.0])
            else:
                merged[name] = self._merge([self.merged[name], tau], [1.0 - self.alpha, self.alpha])
                self.merged[name] = merged[name]
        self.merged = merged
        self.count += 1

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """theta_teacher = theta_0 + tau_merged, in the base's dtypes (theta_0 itself before any add)."""
        if self.merged is None:
            return {k: v.clone() for k, v in self.base.items()}
        return {k: (b.float() + self.merged[k]).to(b.dtype) for k, b in self.base.items()}

    # --- for --resume: train.py saves state_dict() inside its checkpoint -------------------------------

    def _config(self) -> dict:
        return {"mode": self.mode, "alpha": self.alpha, "method": self.method, "density": self.density}

    def state_dict(self) -> dict:
        """A snapshot: an add() after it replaces tensors in this object's dicts, not in the snapshot's."""
        merged = None if self.merged is None else dict(self.merged)
        return {**self._config(), "count": self.count, "base": dict(self.base), "merged": merged}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore from `state_dict()`. The merge settings must match this object's (else ValueError)."""
        cfg = {k: sd.get(k) for k in self._config()}
        if cfg != self._config():
            raise ValueError(f"merge history settings {cfg} differ from this run's {self._config()}")
        base, merged = sd["base"], sd["merged"]
        _check_state(base, self.base, "saved base")
        if merged is not None:
            _check_state(merged, self.base, "saved merge")
        dev = {k: v.device for k, v in self.base.items()}
        self.base = {k: v.detach().to(dev[k], self.base[k].dtype).clone() for k, v in base.items()}
        self.merged = None if merged is None else {k: v.to(dev[k], torch.float32).clone() for k, v in merged.items()}
        self.count = int(sd["count"])
