"""train.py under torchrun: two gloo processes on CPU (OMP_NUM_THREADS=1, a free port each time).

What holds, and is tested:
- one PPO step on a fixed rollout split over two ranks (half the envs each, global advantage normalisation,
  gradients averaged before the clip) equals the one-process step on the whole rollout, to float tolerance
  (ppo-epochs 1, minibatch = the whole buffer: the mean of the two half-batch gradients is the full-batch one);
- the ranks' agent, merged teacher and image critic stay bit-identical after every update of a real run
  (checksum_worker);
- only rank 0 writes metrics (same keys as one process) and args.json (with world_size); each rank restores its
  own state on --resume and a killed 2-process run resumes to the same metrics as an uninterrupted one.

What does not hold, and why it is not tested: a whole 2-process run does not reproduce the 1-process run
with the same seed. Rank 0's envs start on the same levels as the first N/2 envs of the 1-process run, but
LockstepEnvs numbers episodes over all its envs in reset order, so later levels differ; and sampling draws
a [N/2, V] batch of random numbers per token instead of [N, V], so the answers differ from the first token.

This file is also the worker script: `torchrun --nproc_per_node 2 tests/test_distributed.py DIR` (one PPO step) or
`... tests/test_distributed.py --sums DIR TRAIN_FLAGS` (a real run that logs each rank's weight checksums).
"""
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *argv, cwd, extra_env=None, wait=True, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), script, *argv]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# One PPO step: 2 ranks x 2 envs == 1 rank x 4 envs

STEP_ARGS = dict(task="gridworld", model="tiny", method="ppo", num_envs=4, num_steps=4, ppo_epochs=1, minibatch=16,
                 max_new_tokens=24, bf16=False, threads=1)


SPREAD = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # mean 10.5, squared deviations summing to 703.5


def one_step(agent, batches, buf, last, args):
    """ppo_update with plain SGD (Adam's first step is ~lr * sign(g) and would hide a wrong gradient scale).
    Returns the change of every trained tensor and the logged losses."""
    params = [p for p in agent.model.parameters() if p.requires_grad] + list(agent.value_head.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    stats = {"skipped_steps": 0, "skips_in_row": 0}
    _, losses = train.ppo_update(agent, opt, params, train.ppo_data(batches, buf, last, args), args, stats)
    return [p.detach() - b for p, b in zip(params, before)], losses


def columns(batches, buf, last, cols):
    """The rollout of envs `cols` only: what a rank holding just those envs would have collected."""
    idx = torch.tensor(cols)
    return [b.select(idx) for b in batches], {k: v[:, idx] for k, v in buf.items()}, last[idx]


def worker(workdir):
    """One rank: init from torchrun's env vars, take its half of the envs, one step, save the change."""
    from agent import Agent
    args = train.Args(**STEP_ARGS)
    torch.set_num_threads(1)
    train.init_distributed(args)
    rank, n = train.world()
    data = torch.load(os.path.join(workdir, "rollout.pt"), weights_only=False)
    per = args.num_envs // n
    part = columns(data["batches"], data["buf"], data["last"], list(range(rank * per, (rank + 1) * per)))
    delta, losses = one_step(Agent.load(os.path.join(workdir, "agent")), *part, args)
    half = len(SPREAD) // n
    mean_std = train.global_mean_std(SPREAD[rank * half:(rank + 1) * half])
    torch.save({"delta": delta, "losses": losses, "mean_std": mean_std}, os.path.join(workdir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_ranks_with_half_the_envs_each_take_the_one_process_step(tmp_path):
    from agent import Agent
    from env import LockstepEnvs
    torch.set_num_threads(1)
    args = train.Args(**STEP_ARGS)
    Agent.build("tiny", train.tokenizer_corpus(0, episodes_per_task=8), seed=0).save(tmp_path / "agent")
    agent = Agent.load(tmp_path / "agent")  # both sides start from the same file
    torch.manual_seed(0)
    stats = train.new_stats()
    batches, buf, last = train.rollout(agent, None, LockstepEnvs("gridworld", 4, seed=0), args, stats)
    buf["values"] = torch.rand(buf["values"].shape, generator=torch.Generator().manual_seed(0))  # a critic's guesses
    torch.save({"batches": batches, "buf": buf, "last": last}, tmp_path / "rollout.pt")

    r = torchrun(os.path.abspath(__file__), str(tmp_path), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    ref_delta, ref_losses = one_step(Agent.load(tmp_path / "agent"), batches, buf, last, args)
    # the same step on both ranks, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["delta"], ranks[1]["delta"]))
    # ... and it is the one-process full-batch step, to float tolerance
    scale = max(d.abs().max().item() for d in ref_delta)
    assert scale > 1e-3  # the step really moved the weights
    err = max((a - b).abs().max().item() for a, b in zip(ranks[0]["delta"], ref_delta))
    assert err < 1e-4 * scale
    for k in ("losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance"):
        assert abs(ranks[0]["losses"][k] - ref_losses[k]) <= 1e-5 * (1 + abs(ref_losses[k])), k
    # advantages are normalised by the unbiased std of all ranks' turns: the PPO step above cannot show its scale
    # (the gradient clip and the zero-mean policy loss hide it), so the two ranks' halves of SPREAD show it
    for r in ranks:
        assert torch.allclose(torch.stack(r["mean_std"]), torch.tensor([10.5, math.sqrt(703.5 / 5)]))
    # a rank that stepped on its own half (local gradient, local normalisation) would be far off
    alone, _ = one_step(Agent.load(tmp_path / "agent"), *columns(batches, buf, last, [0, 1]), args)
    assert max((a - b).abs().max().item() for a, b in zip(alone, ref_delta)) > 100 * err + 1e-3 * scale


# ---------------------------------------------------------------------------------------------------------
# A real run: identical ranks, rank-0 files, kill and resume

RUN = ["--task", "gridworld", "--model", "tiny", "--sft-steps", "10", "--num-envs", "4", "--num-steps", "4",
       "--total-steps", "64", "--ppo-epochs", "2", "--minibatch", "8", "--max-new-tokens", "24",
       "--eval-episodes", "0", "--method", "turbo-kl", "--threads", "1"]
TRAIN = os.path.join(ROOT, "train.py")


def metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("charts/wall_time", "teacher/time")}
            for line in open(path)]


def checksum_worker(sums_dir, argv):
    """One rank of a real train.py run that, before each checkpoint, appends the SHA-256 of its agent's,
    teacher's and image critic's trained weights to sums_dir/rank<r>.jsonl."""
    save = train.save_checkpoint

    def save_with_checksums(args, update, agent, teacher, *rest):
        row = {"update": update, "rank": train.world()[0]}
        critic = rest[6] if len(rest) > 6 else None  # save_checkpoint's last argument
        for name, model in (("agent", agent), ("teacher", teacher), ("critic", critic)):
            if model is not None:
                sha = hashlib.sha256()
                tensors = model.state_dict().values() if name == "critic" else \
                    [*model.trainable_state().values(), *model.value_head.state_dict().values()]
                for t in tensors:
                    sha.update(t.detach().float().cpu().numpy().tobytes())
                row[name] = sha.hexdigest()
        with open(os.path.join(sums_dir, f"rank{row['rank']}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        save(args, update, agent, teacher, *rest)

    train.save_checkpoint = save_with_checksums  # main() looks it up in train's globals
    train.main(train.parse_args(argv))


def test_two_process_run_keeps_ranks_identical_and_resumes_exactly(tmp_path):
    from test_train import EXTRA_KEYS, METRIC_KEYS
    sums = tmp_path / "sums"
    sums.mkdir()
    # a fresh cwd: rank 0 runs the SFT warm-up and writes the cache, rank 1 waits and loads it
    full = torchrun(os.path.abspath(__file__), "--sums", str(sums), *RUN, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    rows = [[json.loads(line) for line in open(sums / f"rank{r}.jsonl")] for r in range(2)]
    assert [row["update"] for row in rows[0]] == [1, 2, 3, 4]
    for a, b in zip(*rows):  # agent, merged teacher and critic equal on both ranks after every update
        assert (a["agent"], a["teacher"], a["critic"]) == (b["agent"], b["teacher"], b["critic"])
    assert len({row["agent"] for row in rows[0]}) == len({row["critic"] for row in rows[0]}) == 4  # ... all changed
    a = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [row["update"] for row in a] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert set(a[0]) == METRIC_KEYS | EXTRA_KEYS and a[-1]["env_steps"] == 64  # global counts
    assert json.load(open(tmp_path / "full" / "args.json"))["world_size"] == 2
    assert sorted(os.listdir(tmp_path / "full" / "ckpt")) == ["agent", "manifest.json", "state.pt", "state_rank1.pt", "teacher"]

    killed = tmp_path / "killed"
    p = torchrun(TRAIN, *RUN, "--out", str(killed), cwd=tmp_path, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # stop it as soon as update 2 is logged: mid-save or mid-update 3
        if (killed / "metrics.jsonl").exists() and len(open(killed / "metrics.jsonl").readlines()) >= 2:
            p.send_signal(signal.SIGTERM)  # torchrun passes it on and both workers die where they are
            break
        time.sleep(0.02)
    assert p.wait(timeout=60) != 0
    assert len(open(killed / "metrics.jsonl").readlines()) < 4  # it really was cut short
    resumed = torchrun(TRAIN, "--resume", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(killed / "metrics.jsonl") == metrics(tmp_path / "full" / "metrics.jsonl")

    # one process cannot continue a 2-process run: it is told how to resume it
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    alone = subprocess.run([sys.executable, TRAIN, "--resume", str(killed)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1 and "written by 2 processes" in alone.stderr and "Traceback" not in alone.stderr


def test_envs_not_divisible_by_ranks_exits_2():
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")  # what torchrun --nproc_per_node 2 sets
    r = subprocess.run([sys.executable, TRAIN, "--num-envs", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--num-envs 3 must be divisible by the 2 torchrun processes" in r.stderr


if __name__ == "__main__":
    if sys.argv[1] == "--sums":
        checksum_worker(sys.argv[2], sys.argv[3:])
    else:
        worker(sys.argv[1])
