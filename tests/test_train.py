"""train.py: the loop's arithmetic by hand, the CLI's errors, and smoke runs of the script itself."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402


def test_gae_by_hand_with_terminal_in_the_middle():
    # gamma 0.9, lambda 0.95; the episode ends with turn 1, so turn 1 does not bootstrap from turn 2.
    rewards = torch.tensor([[1.0], [0.0], [2.0], [1.0]])
    values = torch.tensor([[0.5], [1.0], [0.0], [2.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    adv = train.gae(rewards, values, dones, torch.tensor([3.0]), gamma=0.9, lam=0.95)
    # t3: 1 + 0.9*3 - 2 = 1.7;  t2: 2 + 0.9*2 - 0 = 3.8, + 0.855*1.7 = 5.2535
    # t1: terminal: 0 - 1 = -1;  t0: 1 + 0.9*1 - 0.5 = 1.4, + 0.855*(-1) = 0.545
    assert torch.allclose(adv.squeeze(1), torch.tensor([0.545, -1.0, 5.2535, 1.7]), atol=1e-6)


def test_ratio_is_exp_of_lambda_weighted_logp_difference():
    thought = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    action = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.1]])
    new = torch.tensor([[-0.5, -1.5, -0.3, -0.1]])
    new_seq = train.sequence_logp(new, thought, action, 0.5)
    old_seq = train.sequence_logp(old, thought, action, 0.5)
    # thought: 0.5 * (0.5 + 0.5) = 0.5; action: 0.2 + 0 = 0.2 -> ratio e^0.7
    assert math.isclose((new_seq - old_seq).exp().item(), math.exp(0.7), rel_tol=1e-6)
    # advantage +1, ratio 2.01 is clipped at 1.1: policy loss -1.1
    pg, vl, _, clipfrac = train.ppo_loss(new_seq, old_seq, torch.tensor([1.0]), torch.tensor([0.0]),
                                        torch.tensor([0.0]), torch.tensor([1.0]), clip=0.1)
    assert math.isclose(pg.item(), -1.1, rel_tol=1e-6) and clipfrac.item() == 1.0
    # value moved 0 -> 0 with return 1: 0.5 * 1^2
    assert math.isclose(vl.item(), 0.5, rel_tol=1e-6)


def run_train(*argv, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, needle", [
    (["--task", "chess"], "--task"),
    (["--method", "dpo"], "--method"),
    (["--total-steps", "0"], "--total-steps"),
    (["--num-envs", "-3"], "--num-envs"),
    (["--model", "/nonexistent/qwen"], "does not exist"),
])
def test_bad_cli_values_exit_2_with_a_message(argv, needle):
    r = run_train(*argv)
    assert r.returncode == 2
    assert needle in r.stderr.strip().splitlines()[-1]


def test_model_dir_that_is_not_a_vlm_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = run_train("--model", str(tmp_path))
    assert r.returncode == 2 and "not a vision-language checkpoint" in r.stderr


SMOKE = ["--task", "gridworld", "--model", "tiny", "--sft-steps", "10", "--num-envs", "4", "--num-steps", "4",
         "--total-steps", "32", "--ppo-epochs", "2", "--minibatch", "8", "--max-new-tokens", "48",
         "--eval-episodes", "4"]
METRIC_KEYS = {"update", "env_steps", "charts/success_rate", "charts/episodic_return", "charts/format_rate",
               "charts/invalid_rate", "charts/thought_grounding", "charts/thought_entropy", "teacher/kl",
               "losses/policy", "losses/value", "losses/approx_kl", "losses/clipfrac", "charts/lr",
               "charts/wall_time", "teacher/time"}


@pytest.mark.parametrize("method", ["ppo", "turbo-kl"])
def test_smoke_two_updates(method, tmp_path):
    r = run_train(*SMOKE, "--method", method, "--out", str(tmp_path / method))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    assert [row["update"] for row in rows] == [1, 2]
    assert METRIC_KEYS <= set(rows[0]) and rows[1]["env_steps"] == 32
    ev = json.load(open(tmp_path / method / "eval.json"))
    assert ("teacher" in ev) == (method == "turbo-kl") and ev["agent"]["episodes"] == 4
    from agent import Agent
    Agent.load(str(tmp_path / method / "ckpt" / "agent"))  # the checkpoint is a loadable agent


def test_plain_save_pretrained_directory_trains(tmp_path):
    from agent import Agent
    tiny = Agent.build("tiny", ['{"thoughts": "player at row 1 col 1.", "action": "up"}'] * 4, seed=0)
    tiny.model.save_pretrained(tmp_path / "qwen")  # what a real Qwen2.5-VL directory holds: model + processor
    tiny.processor.save_pretrained(tmp_path / "qwen")
    r = run_train("--task", "gridworld", "--model", str(tmp_path / "qwen"), "--num-envs", "2", "--num-steps", "2",
                  "--total-steps", "4", "--ppo-epochs", "1", "--max-new-tokens", "16", "--eval-episodes", "0",
                  "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 1


def test_kl_penalty_is_zero_when_teacher_equals_agent():
    from agent import Agent
    from env import LockstepEnvs
    args = train.Args(task="gridworld", model="tiny", num_envs=3, num_steps=2, max_new_tokens=24, bf16=False)
    torch.manual_seed(0)
    agent = Agent.build("tiny", train.tokenizer_corpus(0, episodes_per_task=8), seed=0)
    envs = LockstepEnvs("gridworld", 3, seed=0)
    stats = {"teacher_time": 0.0, "episodes": []}
    _, buf, _ = train.rollout(agent, agent.copy_frozen(), envs, args, stats)
    assert buf["kl"].shape == (2, 3) and torch.equal(buf["kl"], torch.zeros(2, 3))
    # a teacher that differs gives a positive penalty on the same turns
    other = Agent.build("tiny", train.tokenizer_corpus(0, episodes_per_task=8), seed=1)
    _, buf2, _ = train.rollout(agent, other.copy_frozen(), envs, args, stats)
    assert (buf2["kl"] > 0).all()
