"""Benchmark of merge.py: merge time and peak memory against the number of checkpoints.

Two synthetic trainable states with transformer-like shapes (embedding, attention, MLP, norms, lm_head):
  5M:   vocab 512, hidden 256, 5 layers, MLP 1024, fp32   (5.5M entries: about the project's small agent)
  100M: vocab 32000, hidden 768, 7 layers, MLP 3072, bf16 (115M entries; bf16 keeps 64 checkpoint files at 14.7 GB)
Checkpoint i = base + 0.01 * N(0, 1) noise (seeded), so every entry has sign conflicts to resolve.

running: one MergeHistory (SMA, TIES, density 0.8), one checkpoint per add(), built in memory just
         before its add; time = the add() calls only; after n adds, teacher_state() is built once.
exact:   `exact_ties_merge` (defined here): one TIES over n checkpoint files in a temp dir, all weights 1,
         streamed tensor by tensor; time = that call only.

Peak memory is measured honestly: every configuration runs in a fresh Python subprocess, and the number
reported is the kernel's peak resident set size of that process (VmHWM, which sees torch's allocations and
starts afresh at exec) minus the same peak right after the imports. For running, one process adds up to the
largest n and reports at each n on the way (the peak is a running one, so this equals separate runs). Usage:
    python scripts/bench_merge.py                 # both sizes, n = 1, 4, 16, 64 (about 10-15 min on 2 cores)
    python scripts/bench_merge.py --sizes 5M --counts 1,4
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from merge import MergeHistory, ties_tensor  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# checkpoints on disk and the exact merge over them


def save_tensors(state, path):
    """Write {name: tensor} to a safetensors file; atomic, so a crash never leaves half a file."""
    # imported here, not at the top: agent imports transformers, which would raise the memory baseline of
    # the measuring children (they never write a file)
    from agent import atomic_write
    atomic_write(path, lambda tmp: save_file(dict(state), str(tmp)))


def read_tensor(path, name):
    """One tensor from a safetensors file; a corrupt file raises ValueError naming it. The file is opened
    for each read: safe_open memory-maps it, and n maps held open would keep every page read so far
    resident, O(n x model) instead of O(model); reopening costs one header parse per tensor."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise ValueError(f"cannot read tensor {name!r} from {os.fspath(path)!r}: {e}") from e


def exact_ties_merge(paths, base, density=0.8):
    """One TIES over every checkpoint file, all weights 1 (SMA): returns theta_0 + ties(tau_1..tau_n).

    Streamed: for each tensor name the files are read one at a time into merge.ties_tensor's accumulators,
    so memory is O(model) for base and result + O(one tensor) whatever n. Unlike merge.MergeHistory's
    running merge, nothing is re-trimmed between checkpoints (see its docstring for how the two differ).
    """
    paths = list(paths)
    out = {}
    for name, b in base.items():
        taus = (read_tensor(p, name).float() - b.float() for p in paths)  # [*b.shape] fp32, one at a time
        out[name] = (b.float() + ties_tensor(taus, [1.0] * len(paths), density)).to(b.dtype)
    return out


SIZES = {  # vocab, hidden, layers, mlp, dtype
    "5M": (512, 256, 5, 1024, torch.float32),
    "100M": (32000, 768, 7, 3072, torch.bfloat16),
}


def shapes(vocab, hidden, layers, mlp):
    out = {"embed.weight": (vocab, hidden), "norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        out.update({p + "attn_norm.weight": (hidden,), p + "mlp_norm.weight": (hidden,)})
        out.update({p + f"attn.{n}.weight": (hidden, hidden) for n in "qkvo"})
        out.update({p + "mlp.gate.weight": (mlp, hidden), p + "mlp.up.weight": (mlp, hidden),
                    p + "mlp.down.weight": (hidden, mlp)})
    return out


def make_state(size, seed, base=None):
    """Seeded synthetic state; with `base`, base + 0.01 noise. Built tensor by tensor."""
    vocab, hidden, layers, mlp, dtype = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shp in shapes(vocab, hidden, layers, mlp).items():
        x = torch.randn(shp, generator=g)
        out[name] = (x * 0.02 if base is None else base[name].float() + 0.01 * x).to(dtype)
    return out


THREADS = 0


def peak_mb():
    """Peak resident memory of this process in MB. Linux: VmHWM, which starts afresh at exec; ru_maxrss
    would carry over the parent's peak through fork + exec and hide a child's smaller one."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args):
    baseline = peak_mb()
    base = make_state(args.size, 0)
    numel = sum(v.numel() for v in base.values())
    model_mb = sum(v.numel() * v.element_size() for v in base.values()) / 2**20
    info = {"size": args.size, "params": numel, "model_mb": round(model_mb, 1)}
    counts = [int(c) for c in args.counts.split(",")]
    if args.child == "write":
        t0 = time.perf_counter()
        for i in range(max(counts)):
            save_tensors(make_state(args.size, i + 1, base), os.path.join(args.dir, f"ckpt{i:03d}.safetensors"))
        print(json.dumps({**info, "mode": "write", "n": max(counts), "seconds": time.perf_counter() - t0}))
    elif args.child == "running":
        h = MergeHistory(base, mode="sma", method="ties", density=0.8)
        spent = 0.0
        for i in range(max(counts)):
            state = make_state(args.size, i + 1, base)
            t0 = time.perf_counter()
            h.add([state])
            spent += time.perf_counter() - t0
            del state
            if i + 1 in counts:
                teacher = h.teacher_state()
                del teacher
                print(json.dumps({**info, "mode": "running", "n": i + 1, "seconds": spent,
                                  "peak_mb": peak_mb() - baseline}), flush=True)
    else:  # exact, one n per process
        n = counts[0]
        paths = [os.path.join(args.dir, f"ckpt{i:03d}.safetensors") for i in range(n)]
        t0 = time.perf_counter()
        teacher = exact_ties_merge(paths, base, density=0.8)
        spent = time.perf_counter() - t0
        del teacher
        print(json.dumps({**info, "mode": "exact", "n": n, "seconds": spent, "peak_mb": peak_mb() - baseline}))


def run_child(*argv):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--threads", str(THREADS)],
                         check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5M,100M")
    p.add_argument("--counts", default="1,4,16,64")
    p.add_argument("--dir", default=None, help="where to write checkpoint files (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier "
                   "on a shared 2-core box, where 2 threads stall whenever another process holds a core")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    global THREADS
    THREADS = args.threads
    counts = [int(c) for c in args.counts.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peak = peak resident memory (VmHWM) "
          "above the post-import baseline, fresh process per configuration")
    print("| size | dtype | model MB | method | checkpoints | merge s | s / checkpoint | peak MB | peak / model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        dtype = str(SIZES[size][4]).replace("torch.", "")
        rows = run_child("--child", "running", "--size", size, "--counts", args.counts)
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            w = run_child("--child", "write", "--size", size, "--counts", args.counts, "--dir", d)[0]
            print(f"<!-- {size}: wrote {w['n']} checkpoint files in {w['seconds']:.0f} s -->", flush=True)
            for n in counts:
                rows += run_child("--child", "exact", "--size", size, "--counts", str(n), "--dir", d)
        for r in rows:
            print(f"| {size} ({r['params'] / 1e6:.1f}M) | {dtype} | {r['model_mb']:.0f} | {r['mode']} | {r['n']} | "
                  f"{r['seconds']:.2f} | {r['seconds'] / r['n']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] / r['model_mb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
