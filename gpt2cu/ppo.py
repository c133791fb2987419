"""RL fine-tuning with PPO or GRPO: `python -m gpt2cu.ppo`.

    python -m gpt2cu.ppo --policy model.bin --prompts prompts.jsonl --reward mymodule:reward -o log_ppo
    python -m gpt2cu.ppo --policy model.bin --prompts prompts.jsonl --reward-model rm.bin --algo grpo -o log_grpo

The policy is an llm.c model file or a Hugging Face GPT-2 directory; prompts are JSONL {"prompt": ...}.
The reward is a Python function `module:function(prompts, completions) -> list[float]` (importable from
the current directory) or a reward model file from `python -m gpt2cu.reward`. Each step samples
completions, scores them and runs the updates (gpt2cu/rl/ppo.py); main.log gets per step the mean reward
(rwd), the KL to the reference (kl), the entropy (ent), the clip fraction (clip), the value loss (vloss),
the explained variance (ev), the tokens per second of the rollout (rtok: completion tokens sampled), the
score forwards (stok) and the updates (utok: positions, as pretraining counts them) and, with
--eval-prompts, the held-out mean reward (evr); `python -m gpt2cu.plot` draws them. -n N checkpoints every
N steps (the policy as a model file, usable by gpt2cu.sample) and -y 1 resumes from the newest one. Bad
input is one line and exit code 2.

Data-parallel under mpirun, with the global batch of one rank (rl/ppo.py says how):
    mpirun -np 2 python -m gpt2cu.ppo --policy model.bin --prompts prompts.jsonl --reward mymodule:reward -o log_ppo
--minibatch and --prompts-per-step must split evenly over the ranks. Rank 0 prints, writes main.log and
the model files; every rank writes its own state file, and a checkpoint is resumed by as many ranks as
wrote it.
"""
from __future__ import annotations

import argparse
import os
import sys

from .rl.ppo import ALGOS, PPO, PPOConfig
from .rl.text import InputError, codec_for, document_tokens, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.ppo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--policy", required=True, help="starting policy (and frozen reference): llm.c model file or HF directory")
    a("--prompts", required=True, help="JSONL prompts to train on")
    reward = p.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward", help="module:function(prompts, completions) -> list[float]")
    reward.add_argument("--reward-model", help="a reward model file (python -m gpt2cu.reward)")
    a("--algo", default="ppo", choices=ALGOS)
    a("-o", dest="output_dir", default=None, help="directory for main.log and checkpoints")
    a("--steps", type=int, default=100)
    a("--prompts-per-step", type=int, default=32)
    a("--group-size", type=int, default=4, help="GRPO: completions per prompt")
    a("--minibatch", type=int, default=16, help="sequences per update")
    a("--epochs", type=int, default=2, help="passes over each rollout batch")
    a("--max-new-tokens", type=int, default=16)
    a("--temperature", type=float, default=1.0)
    a("--top-k", type=int, default=None)
    a("--lr", type=float, default=1e-5)
    a("--kl-coef", type=float, default=0.05)
    a("--kl-target", type=float, default=None, help="adapt --kl-coef towards this KL per sequence")
    a("--kl-horizon", type=int, default=10000)
    a("--gamma", type=float, default=1.0)
    a("--lam", type=float, default=0.95)
    a("--clip", type=float, default=0.2)
    a("--value-clip", type=float, default=0.2)
    a("--vf-coef", type=float, default=0.1,
      help="PPO: the value loss's weight (the value head shares the policy's trunk)")
    a("--grad-clip", type=float, default=1.0)
    a("--no-whiten", dest="whiten", action="store_false", help="PPO: keep the advantages' scale")
    a("--eval-prompts", default=None, help="held-out JSONL prompts: mean reward at the start, the end and every "
                                           "--eval-every steps")
    a("--eval-every", type=int, default=0)
    a("--eval-reward", default=None, help="module:function to measure the held-out completions with (default: "
                                          "the training reward), e.g. the rule a reward model was trained on")
    a("-n", dest="checkpoint_every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    a("-y", dest="resume", type=int, default=0, choices=(0, 1), help="1: resume from the newest checkpoint in -o")
    a("--backend", default="auto", choices=("auto", "numpy", "cuda"))
    a("--seed", type=int, default=42)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume and not args.output_dir:
        p.error("-y 1 needs -o DIR (where the checkpoints are)")
    if args.steps < 0 or args.eval_every < 0 or args.checkpoint_every < 0:
        p.error("--steps, --eval-every and -n must be >= 0")
    fail = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")
    try:
        config = PPOConfig(algo=args.algo, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                           minibatch=args.minibatch, epochs=args.epochs, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, lr=args.lr, kl_coef=args.kl_coef,
                           kl_target=args.kl_target, kl_horizon=args.kl_horizon, gamma=args.gamma, lam=args.lam,
                           clip=args.clip, value_clip=args.value_clip, vf_coef=args.vf_coef, grad_clip=args.grad_clip,
                           whiten=args.whiten, seed=args.seed)
    except ValueError as e:
        p.error(str(e))

    from .backends import get_backend
    from .dist import abort_on_failure, init_distributed, install_abort_on_exception
    try:
        backend = get_backend(args.backend)
        comm = init_distributed(backend.name)
    except (RuntimeError, ValueError, ImportError) as e:
        fail(e)
    install_abort_on_exception(comm)
    with abort_on_failure(comm):  # a rank that exits alone would leave the others waiting in a collective
        return run(args, p, config, backend, comm)


def run(args, p, config, backend, comm) -> int:
    from .checkpoint import RunMismatch
    from .export import load_weights
    from .rl.ppo import split_problem
    from .rl.rewards import RewardModelReward, load_reward_function
    from .train import Logger
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    fail = lambda message: p.exit(2, f"{p.prog}: error: {message}\n" if comm.rank == 0 else None)
    if split_problem(config, comm.world_size):
        fail(split_problem(config, comm.world_size))
    backend.select_device(comm.local_rank)
    comm.use_stream(backend.stream)  # NCCL collectives queue behind the backend's work
    try:
        cfg, params = load_weights(args.policy)
        codec = codec_for(cfg)
        prompts = [r["prompt"] for r in read_jsonl(args.prompts, ("prompt",))]
        eval_prompts = [r["prompt"] for r in read_jsonl(args.eval_prompts, ("prompt",))] if args.eval_prompts else []
        if args.reward:
            reward_fn = load_reward_function(args.reward)
        else:
            longest = max(len(document_tokens(codec, x)) for x in prompts + eval_prompts)
            reward_fn = RewardModelReward(args.reward_model, cfg, backend, args.minibatch // comm.world_size,
                                          longest + args.max_new_tokens + 1)
        eval_reward = load_reward_function(args.eval_reward) if args.eval_reward else None
        ppo = PPO(cfg, params, backend, config, prompts, reward_fn, codec, eval_prompts, comm)
    except (InputError, OSError, ValueError, RuntimeError, ImportError) as e:
        fail(e)

    try:
        start = ppo.resume(args.output_dir, say) if args.resume else None
    except RunMismatch as e:  # every checkpoint of the directory is of another world size
        fail(e)
    log = Logger(args.output_dir, comm.rank, resume=start is not None)
    say(f"{args.algo}: {len(prompts)} prompts, {config.rollout_rows} sequences per step in minibatches of "
        f"{config.minibatch}, T={ppo.T}, backend {backend.name}"
        + (f", ranks {comm.world_size}" if comm.world_size > 1 else "")
        + (f"; resumed at step {start}" if start is not None else ""))
    try:
        def evaluate(step):
            if eval_prompts:
                value = ppo.evaluate(eval_prompts, eval_reward)
                log.log(step, "evr", value)
                say(f"step {step:5d} | held-out mean reward {value:.4f}", flush=True)
                return value

        before = evaluate(ppo.step_count)
        while ppo.step_count < args.steps:
            s = ppo.step()
            fields = [("rwd", s.reward), ("kl", s.kl), ("ent", s.entropy), ("clip", s.clip_frac)]
            if args.algo == "ppo":  # GRPO has no value head
                fields += [("vloss", s.value_loss), ("ev", s.explained_var)]
            fields += [("rtok", s.rollout_tokens_per_s), ("stok", s.score_tokens_per_s),
                       ("utok", s.update_tokens_per_s)]
            for key, value in fields:
                log.log(s.step, key, value)
            say(f"step {s.step:5d}/{args.steps} | reward {s.reward:.4f} | kl {s.kl:.4f} (coef {s.kl_coef:.4f}) | "
                f"entropy {s.entropy:.3f} | clip {s.clip_frac:.3f} | value loss {s.value_loss:.4f} | "
                f"ev {s.explained_var:.3f} | rollout {s.rollout_tokens_per_s:,.0f} tok/s | "
                f"score {s.score_tokens_per_s:,.0f} tok/s | update {s.update_tokens_per_s:,.0f} tok/s | "
                f"{s.seconds * 1000:.0f} ms", flush=True)
            last = s.step == args.steps
            if args.eval_every and s.step % args.eval_every == 0 and not last:
                evaluate(s.step)
            if args.output_dir and ((args.checkpoint_every and s.step % args.checkpoint_every == 0) or last):
                ppo.save(args.output_dir)
        if eval_prompts:
            say(f"held-out mean reward: {before:.4f} -> {evaluate(ppo.step_count):.4f}")
    except InputError as e:  # a reward function that fails on the completions it is given (this rank's)
        where = f" (rank {comm.rank})" if comm.world_size > 1 else ""
        p.exit(2, f"{p.prog}: error{where}: {e}\n")
    if args.output_dir:
        say(f"policy: {os.path.join(args.output_dir, f'model_{ppo.step_count:08d}.bin')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
