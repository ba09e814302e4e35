"""Env turns per second of train.py's own default update (rollout + teacher + PPO + merge), and its split.

Runs `train.main` of the source tree given by --root (this checkout, or an exported older commit: see
`scripts/bench.py --only loop`) on a random-init small agent saved to disk and passed with --init, so the SFT
warm-up is skipped and both trees play the same envs with the same batch. A random-init model does not
write its format, so every answer is forced to the mean token length of that tree's expert answers
(min_new_tokens = max_new_tokens): each tree pays for the turns its own format makes. Prints one JSON line:
turns/s over the updates after the first (the first warms up), and seconds per update spent in
generate (sampling), scoring (the teacher-forced forward that fills log-probs and values), teacher
(turbo-kl's teacher forward), ppo (the optimizer epochs), env (parsing and stepping).
Usage: python scripts/bench_loop.py --root DIR --bf16 on|off [--threads 2] [--updates 4]
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="source tree whose train.py is timed")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--bf16", choices=("on", "off"), required=True,
                   help="autocast of both trees (an old tree may default to bf16 where it is many times slower)")
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be >= 2: the first warms up, the rate is over the others")
    root = os.path.abspath(a.root)
    sys.path.insert(0, root)
    os.chdir(root)
    import torch
    import agent as agent_mod
    import env as env_mod
    import train
    if a.threads:
        torch.set_num_threads(a.threads)

    spent = collections.defaultdict(float)

    def timed(obj, name, key):
        f = getattr(obj, name)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
        setattr(obj, name, wrapper)

    corpus = train.tokenizer_corpus(1)
    torch.manual_seed(1)
    agent = agent_mod.Agent.build("small", corpus, seed=1)
    envs = env_mod.LockstepEnvs("sokoban", 64, seed=1)
    lengths = [len(agent.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in envs.expert_texts()]
    n_tokens = round(sum(lengths) / len(lengths))   # + 1: the EOS

    sample = agent_mod.Agent.sample

    def forced(self, images, prompts, **kw):
        kw.update(min_new_tokens=n_tokens, max_new_tokens=n_tokens)
        return sample(self, images, prompts, **kw)
    agent_mod.Agent.sample = forced
    scoring = "_fill_stats" if hasattr(agent_mod.Agent, "_fill_stats") else "encode"  # the old tree's second forward
    timed(agent_mod.Agent, scoring, "scoring")
    timed(agent_mod.Qwen2_5_VLForConditionalGeneration, "generate", "generate")   # trees sampling with generate
    if hasattr(agent_mod.Agent, "decode"):
        timed(agent_mod.Agent, "decode", "generate")                              # the KV-cache decoder
    timed(train, "teacher_kl", "teacher")
    timed(train, "ppo_update", "ppo")
    timed(env_mod.LockstepEnvs, "step_texts", "env")

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        agent.save(init)
        argv = ["--init", init, "--out", os.path.join(tmp, "run"), "--eval-episodes", "0",
                "--total-steps", str(512 * a.updates), "--seed", "1"]
        if a.threads:
            argv += ["--threads", str(a.threads)]
        argv.append("--bf16" if a.bf16 == "on" else "--no-bf16")
        args = train.parse_args(argv)
        train.main(args)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    walls = [r["charts/wall_time"] for r in rows]
    turns = rows[-1]["env_steps"] - rows[0]["env_steps"]
    rate = turns / (walls[-1] - walls[0])
    n = len(rows)
    split = {"generate": spent["generate"] / n, "scoring": spent["scoring"] / n, "teacher": spent["teacher"] / n,
             "ppo": spent["ppo"] / n, "env": spent["env"] / n}
    print(json.dumps({"root": root, "tokens_per_answer": n_tokens, "threads": torch.get_num_threads(), "bf16": a.bf16,
                      "turns_per_s": rate, "seconds_per_update": {k: round(v, 3) for k, v in split.items()},
                      "wall_per_update": (walls[-1] - walls[0]) / (n - 1)}))


if __name__ == "__main__":
    main()
