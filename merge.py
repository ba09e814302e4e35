"""merge.py: the free teacher of GTR-Turbo, built by merging the agent's own checkpoints.

Implements GTR_TURBO.md section 4.1:
- task vectors `tau_i = theta_i - theta_0` relative to the SFT-initialised weights theta_0;
- `ties_merge`: TIES (trim to the top `density` fraction by magnitude, elect a sign per entry from the
  weighted sum, disjoint weighted mean over the entries that agree), and `linear_merge` for the ablation;
- `MergeHistory`: the base weights plus a *running* merge that is carried forward update after update
  (SMA or EMA over the history), so `theta_teacher = theta_0 + tau_merged` costs O(model) memory however
  many checkpoints have been folded in;
- `exact_ties_merge`: one TIES over every checkpoint kept on disk, streamed tensor by tensor;
- `save_state` / `load_state`: atomic safetensors files for trainable states (the on-disk history).

How TIES is computed here (one pass, O(one tensor) extra memory): after trimming, the entries that agree
with the elected sign are exactly the positive ones (elected +) or the negative ones (elected -), so it is
enough to accumulate, per entry, P = sum_i w_i max(t_i, 0), N = sum_i w_i min(t_i, 0) and the weights
W+ / W- of the strictly positive / negative entries. Elected sign = sign(P + N) (0 counts as +), and the
merged value is P / W+ or N / W- (0 where that weight is 0). The members can therefore be a generator
(tensors read from disk one at a time), and no stack of all members is ever built.

Left out on purpose: per-tensor densities, DARE-style random dropping, rescaling after the trim, windows
over the history (the paper uses all of it), and any knowledge of LoRA: for a LoRA agent the trainable
"state" is already the effective delta `B @ A * scale` with base zeros (see agent.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

State = Mapping[str, torch.Tensor]
_FORMAT = "gtr-turbo-merge-history/1"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


# ----------------------------------------------------------------------------------------------------
# TIES on one tensor


def _keep_count(density: float, numel: int) -> int:
    """k = max(1, floor(density * numel)); the 1e-9 guards float error (0.29 * 100 = 28.999...)."""
    return max(1, math.floor(density * numel + 1e-9))


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep exactly k = max(1, floor(density * numel)) entries of largest magnitude.

    Ties at the threshold magnitude are broken by flat index (lowest first), so the result is
    deterministic. A threshold of 0 needs no tie-break: kept zeros and dropped zeros are the same.
    """
    n = x.numel()
    k = _keep_count(density, n)
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


def _ties_tensor(members: Iterable[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES over one tensor name. `members` may be a lazy iterable (read from disk one by one).

    Returns fp32. See the module docstring for why four accumulators are enough.
    """
    pos = neg = wpos = wneg = None
    count = 0
    for x, w in zip(members, weights):
        t = trim(x.float(), density)  # fp32 whatever the storage dtype
        if pos is None:
            pos, neg = torch.zeros_like(t), torch.zeros_like(t)
            wpos, wneg = torch.zeros_like(t), torch.zeros_like(t)
        pos.add_(t.clamp_min(0), alpha=w)
        neg.add_(t.clamp_max(0), alpha=w)
        wpos.add_((t > 0).float(), alpha=w)
        wneg.add_((t < 0).float(), alpha=w)
        count += 1
    if count != len(weights):
        raise ValueError(f"got {count} tensors for {len(weights)} weights")
    plus = (pos + neg) >= 0  # elected sign of sum_i w_i t_i; zero counts as +
    num = torch.where(plus, pos, neg)
    den = torch.where(plus, wpos, wneg)
    # where nothing agrees (den == 0) num is 0 too: the merged entry is 0
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _linear_tensor(members: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean sum_i w_i x_i / sum_i w_i over one tensor name, fp32, streamed."""
    acc = None
    count = 0
    for x, w in zip(members, weights):
        acc = x.float() * w if acc is None else acc.add_(x.float(), alpha=w)
        count += 1
    if count != len(weights):
        raise ValueError(f"got {count} tensors for {len(weights)} weights")
    return acc / sum(weights)


# ----------------------------------------------------------------------------------------------------
# checks shared by the public functions


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


def _check_keys(keys, reference, what: str) -> None:
    keys, reference = set(keys), set(reference)
    if keys != reference:
        missing, extra = sorted(reference - keys)[:5], sorted(keys - reference)[:5]
        raise ValueError(f"{what}: keys differ from the base (missing {missing}, unexpected {extra})")


def _check_tensor(x: torch.Tensor, ref: torch.Tensor, name: str, what: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{what}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: tensor {name!r} has dtype {x.dtype}; only floating tensors can be merged")


def _merge_dicts(deltas: Sequence[State], weights, fn) -> dict[str, torch.Tensor]:
    weights = _check_weights(weights, len(deltas))
    first = deltas[0]
    for i, d in enumerate(deltas[1:], 1):
        _check_keys(d.keys(), first.keys(), f"delta {i}")
    out = {}
    for name, ref in first.items():  # tensor by tensor: peak extra memory ~ a few copies of one tensor
        for i, d in enumerate(deltas):
            _check_tensor(d[name], ref, name, f"delta {i}")
        out[name] = fn((d[name] for d in deltas), weights).to(ref.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# public merges


def ties_merge(deltas: Sequence[State], weights: Sequence[float], density: float = 0.8) -> dict[str, torch.Tensor]:
    """TIES merge of task vectors (GTR_TURBO.md 4.1). deltas: list of {name: tensor}, same keys and shapes.

    Per tensor: trim each delta to its top k = max(1, floor(density * numel)) magnitudes; elect the sign of
    sum_i w_i trimmed_i (0 -> +); result = sum_i w_i kept_i / sum_i w_i [kept_i != 0] over the entries
    whose sign equals the elected one (0 where none does). fp32 inside, returned in deltas[0]'s dtypes.
    """
    _check_density(density)
    return _merge_dicts(deltas, weights, lambda xs, ws: _ties_tensor(xs, ws, density))


def linear_merge(deltas: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean sum_i w_i delta_i / sum_i w_i (the "linear" ablation of 4.1)."""
    return _merge_dicts(deltas, weights, _linear_tensor)


def ema_weights(n: int, alpha: float = 0.5) -> list[float]:
    """The weights a *linear* EMA gives n checkpoints in order: (1-a)^(n-1), then a (1-a)^(n-i) for i >= 2.

    Handy for `exact_ties_merge(paths, base, weights=ema_weights(len(paths)))`. They sum to 1.
    """
    if n < 1 or not 0 < alpha <= 1:
        raise ValueError(f"need n >= 1 and alpha in (0, 1], got n={n}, alpha={alpha}")
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


# ----------------------------------------------------------------------------------------------------
# trainable states on disk


def _atomic_save(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors write to a temp file beside `path`, then os.replace: a crash never leaves half a file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    seen, clean = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights / fused views share storage; safetensors refuses shared tensors
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[name] = t
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(clean, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open(path, stack: contextlib.ExitStack):
    """safe_open a file, turning a corrupt/unreadable file into an error that names it."""
    try:
        return stack.enter_context(safe_open(os.fspath(path), framework="pt", device="cpu"))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise ValueError(f"cannot read safetensors file {os.fspath(path)!r}: {e}") from e


def save_state(state: State, path) -> None:
    """Write a trainable state {name: tensor} to a safetensors file, atomically."""
    _atomic_save(dict(state), path)


def load_state(path) -> dict[str, torch.Tensor]:
    """Read a trainable state written by `save_state` (CPU tensors). A corrupt file raises ValueError naming it."""
    with contextlib.ExitStack() as stack:
        f = _open(path, stack)
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {os.fspath(path)!r}: {e}") from e


def _sources(items, base: State) -> list[Callable[[str], torch.Tensor]]:
    """One getter name -> tensor per checkpoint; a checkpoint is a state dict or a safetensors path.

    Every key, shape and dtype is checked here, before any merging, so a bad checkpoint cannot leave a
    half-updated merge behind. A file getter opens the file for each tensor it reads and closes it again:
    safe_open memory-maps the file, and keeping 64 maps open would keep every page read so far resident
    (the 5M benchmark grew to 1.4 GB at 64 files that way); reopening costs one header parse per tensor.
    """
    getters = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            _check_keys(item.keys(), base.keys(), f"checkpoint {i}")
            for name, b in base.items():
                _check_tensor(item[name], b, name, f"checkpoint {i}")
            getters.append(item.__getitem__)
        elif isinstance(item, (str, os.PathLike)):
            what = f"checkpoint file {os.fspath(item)!r}"
            with contextlib.ExitStack() as stack:
                f = _open(item, stack)
                _check_keys(f.keys(), base.keys(), what)
                for name, b in base.items():  # shapes from the header only: nothing is loaded yet
                    sl = f.get_slice(name)
                    if list(sl.get_shape()) != list(b.shape) or sl.get_dtype() not in _FLOAT_DTYPES:
                        raise ValueError(f"{what}: tensor {name!r} is {sl.get_dtype()} {sl.get_shape()}, "
                                         f"expected a float tensor of shape {list(b.shape)}")
            getters.append(_file_getter(item))
        else:
            raise TypeError(f"checkpoint {i}: expected a state dict or a path, got {type(item).__name__}")
    return getters


def _file_getter(path):
    def get(name):
        with contextlib.ExitStack() as stack:
            f = _open(path, stack)
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"cannot read tensor {name!r} from {os.fspath(path)!r}: {e}") from e
    return get


def _delta(get, name: str, b: torch.Tensor, what: str) -> torch.Tensor:
    """tau = theta - theta_0 for one tensor, fp32 on the base's device."""
    x = get(name)
    _check_tensor(x, b, name, what)
    return x.to(device=b.device, dtype=torch.float32) - b.float()


def exact_ties_merge(paths: Sequence, base: State, weights: Sequence[float] | None = None,
                     density: float = 0.8) -> dict[str, torch.Tensor]:
    """One TIES over every checkpoint on disk (the `exact` option); returns the teacher state base + tau.

    paths: safetensors files, each a full trainable state (same keys as base); weights default to 1 each
    (SMA; see `ema_weights` for EMA). Streamed: for each tensor name, the files are read one at a time
    into the one-pass TIES accumulators, so memory is O(model) for base and result + O(one tensor).

    How it differs from the running merge of `MergeHistory` (SMA): the running merge stores only the
    merged delta and re-trims it, as one member of weight `count`, at every `add`. After one add the two
    are identical (same members, same weights); after several they differ in general, because (a) the
    running merge's entries dropped by a later trim are gone for good, and (b) an entry of the running
    merge is a disjoint mean, so it counts as `count` votes even where fewer checkpoints agreed.
    tests/test_merge.py::test_exact_and_running_merges works one such case out by hand.
    """
    _check_density(density)
    paths = list(paths)
    weights = _check_weights([1.0] * len(paths) if weights is None else weights, len(paths))
    out = {}
    getters = _sources(paths, base)
    for name, b in base.items():
        members = (_delta(g, name, b, f"checkpoint file {os.fspath(p)!r}") for g, p in zip(getters, paths))
        out[name] = (b.float() + _ties_tensor(members, weights, density)).to(b.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# the running merge


class MergeHistory:
    """Base weights theta_0 and a running merged delta over all checkpoints added so far.

    mode="sma" (simple moving average): every checkpoint has weight 1. `add(states)` makes ONE merge whose
    members are the running merge, with weight `count` (the number of checkpoints it already holds), and
    each new checkpoint's delta, with weight 1:  merged <- merge([merged, tau_1..tau_m], [count, 1..1]).
    The first add has no running member: merged <- merge([tau_1..tau_m], [1..1]).

    mode="ema": the new checkpoints are folded in one at a time, in the given order:
        merged_1 = merge([tau_1], [1])                     (the very first checkpoint ever; = trim(tau_1)
                                                             for TIES, tau_1 for linear)
        merged_k = merge([merged_(k-1), tau_k], [1 - alpha, alpha])
    With method="linear" this is exactly merged_k = alpha tau_k + (1 - alpha) merged_(k-1) (GTR_TURBO.md 4.1);
    with "ties" the same two weights go into TIES (where only one side survives the trim/sign election,
    the disjoint mean takes its value unscaled).

    method: "ties" (default, `density` 0.8) or "linear". The merged delta is kept in fp32 on the base's
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
        for name, b in base.items():
            _check_tensor(b, b, name, "base")
        self.mode, self.alpha, self.method, self.density = mode, float(alpha), method, float(density)
        self.base = {k: v.detach().clone() for k, v in base.items()}  # own copy: the model keeps training
        self.merged: dict[str, torch.Tensor] | None = None  # fp32 deltas, None before the first add
        self.count = 0

    def _merge(self, members, weights) -> torch.Tensor:
        if self.method == "ties":
            return _ties_tensor(members, weights, self.density)
        return _linear_tensor(members, weights)

    def add(self, states) -> None:
        """Fold in the checkpoints of one update (e.g. one per PPO epoch), in order.

        states: a list of full trainable states (dicts with the base's keys) and/or paths to files written
        by `save_state` (read lazily, tensor by tensor). A single dict or path is taken as a list of one.
        Keys, shapes and dtypes are all checked before anything changes; only a read error midway (a file
        whose data is damaged after a valid header) can leave a half-updated merge: reload the last save.
        """
        if isinstance(states, (Mapping, str, os.PathLike)):
            states = [states]
        states = list(states)
        if not states:
            raise ValueError("add() needs at least one checkpoint")
        getters = _sources(states, self.base)
        if self.mode == "sma":
            self._add_sma(getters)
        else:
            for get in getters:
                self._add_ema(get)

    def _add_sma(self, getters) -> None:
        merged = {}
        weights = ([float(self.count)] if self.merged is not None else []) + [1.0] * len(getters)
        for name, b in self.base.items():
            news = (_delta(g, name, b, f"checkpoint {i}") for i, g in enumerate(getters))
            members = news if self.merged is None else _chain(self.merged[name], news)
            merged[name] = self._merge(members, weights)
            if self.merged is not None:
                self.merged[name] = merged[name]  # drop the old tensor now, not after the loop
        self.merged = merged
        self.count += len(getters)

    def _add_ema(self, get) -> None:
        merged = {}
        for name, b in self.base.items():
            tau = _delta(get, name, b, "checkpoint")
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

    # --- persistence (for --resume) -----------------------------------------------------------------

    def _config(self) -> dict:
        return {"mode": self.mode, "alpha": self.alpha, "method": self.method, "density": self.density}

    def state_dict(self) -> dict:
        return {**self._config(), "count": self.count, "base": self.base, "merged": self.merged}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore from `state_dict()`. The merge settings must match this object's (else ValueError)."""
        cfg = {k: sd.get(k) for k in self._config()}
        if cfg != self._config():
            raise ValueError(f"merge history settings {cfg} differ from this run's {self._config()}")
        base, merged = sd["base"], sd["merged"]
        _check_keys(base.keys(), self.base.keys(), "saved base")
        for name, b in self.base.items():
            _check_tensor(base[name], b, name, "saved base")
        if merged is not None:
            _check_keys(merged.keys(), self.base.keys(), "saved merge")
            for name, b in self.base.items():
                _check_tensor(merged[name], b, name, "saved merge")
        dev = {k: v.device for k, v in self.base.items()}
        self.base = {k: v.detach().to(dev[k], self.base[k].dtype).clone() for k, v in base.items()}
        self.merged = None if merged is None else {k: v.to(dev[k], torch.float32).clone() for k, v in merged.items()}
        self.count = int(sd["count"])

    def save(self, path) -> None:
        """One safetensors file: base/<name>, merged/<name> and the settings as metadata; atomic."""
        tensors = {f"base/{k}": v for k, v in self.base.items()}
        if self.merged is not None:
            tensors.update({f"merged/{k}": v for k, v in self.merged.items()})
        meta = {"format": _FORMAT, "config": json.dumps({**self._config(), "count": self.count})}
        _atomic_save(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "MergeHistory":
        """Rebuild a history written by `save`. A corrupt or foreign file raises ValueError naming the path."""
        with contextlib.ExitStack() as stack:
            f = _open(path, stack)
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a saved MergeHistory (format {meta.get('format')!r})")
            try:
                cfg = json.loads(meta["config"])
                tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
            except Exception as e:
                raise ValueError(f"cannot read merge history {os.fspath(path)!r}: {e}") from e
        base = {k[5:]: v for k, v in tensors.items() if k.startswith("base/")}
        merged = {k[7:]: v for k, v in tensors.items() if k.startswith("merged/")}
        count = cfg.pop("count")
        h = cls(base, **cfg)
        h.load_state_dict({**cfg, "count": count, "base": base, "merged": merged or None})
        return h


def _chain(first: torch.Tensor, rest: Iterable[torch.Tensor]):
    yield first
    yield from rest
