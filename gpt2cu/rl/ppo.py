"""PPO and GRPO on gpt2cu's models: rollouts with the KV cache, rewards, then epochs of minibatch updates
through the same ops and optimizer as pretraining.

    ppo = PPO(model_cfg, init_params, backend, PPOConfig(...), prompts, reward_fn, codec)
    stats = ppo.step()         # one rollout batch and its updates -> StepStats
    ppo.evaluate(prompts)      # mean reward of completions of held-out prompts
    ppo.save(out_dir) / ppo.resume(out_dir)

One step: sample completions of a batch of prompts (rollout.py); score them; run the policy, the frozen
reference (the starting policy) and, for PPO, the value model over the sequences for the old
log-probabilities, the reference's, each token's entropy and the values; turn them into advantages;
then `epochs` passes of shuffled minibatches, each one policy update and (PPO) one value update.

  PPO   per-token rewards -kl_coef * (log pi_old - log pi_ref) plus the sequence's reward at its last
        token; GAE(gamma, lambda) over the completion with the value model's values; advantages whitened;
        the clipped surrogate, and the clipped value loss. kl_coef is fixed, or adapted towards kl_target
        (Ziegler et al. 2019: a proportional controller with horizon kl_horizon).
  GRPO  group_size completions per prompt; each completion's advantage is its reward normalized by its
        group's mean and standard deviation, for all its tokens; no value model; the KL to the reference
        is a loss term kl_coef * (r - log r - 1), r = pi_ref / pi (DeepSeekMath's estimator).

The policy loss enters the model as per-token weights on log-probabilities: every term above is
f(log pi(token)) summed over completion tokens, whose gradient is f'(log pi) * d log pi / d logits, and
the fused classifier's gradient of -log pi is (softmax - onehot): so the LM head runs the classifier with
weights[t] = -f'(log pi_t), and the full probability tensor is never stored (one LM-head chunk at a time,
as in pretraining). Getting f' needs log pi under the current parameters first: each minibatch runs the
trunk once, the LM head twice (log-probabilities, then the weighted gradient), then the backward.

The value model is a separate model (a trunk of the policy's shape, started from the policy's weights,
with a scalar head; reward_model.ScalarHeadModel) rather than a head on the policy's trunk: its loss then
never pulls on the policy's features, there is no value-loss coefficient to balance against the policy
loss, and it is the same class as the reward model. It costs a second forward and backward per minibatch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import checkpoint
from ..models import family_of
from ..optim import AdamWConfig
from .reward_model import ModelOptimizer, ScalarHeadModel, build_model
from .rewards import checked_rewards
from .rollout import BatchedDecoder, completion_mask, generate
from .text import document_tokens

ALGOS = ("ppo", "grpo")


@dataclass(frozen=True)
class PPOConfig:
    algo: str = "ppo"
    prompts_per_step: int = 32     # prompts sampled per step (GRPO: each group_size times)
    group_size: int = 4            # GRPO's completions per prompt
    minibatch: int = 16            # sequences per update (the models' B)
    epochs: int = 2                # passes over each rollout batch
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    lr: float = 1e-5               # policy and value model
    kl_coef: float = 0.05
    kl_target: float | None = None  # adapt kl_coef towards this KL per sequence (None: fixed)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2              # the ratio's clip range
    value_clip: float = 0.2
    grad_clip: float = 1.0
    whiten: bool = True            # PPO: advantages to mean 0, std 1 over each rollout batch
    seed: int = 42

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.algo == "grpo" and self.group_size < 2:
            raise ValueError(f"GRPO needs a group of at least 2 completions per prompt, got {self.group_size}")
        for name in ("prompts_per_step", "minibatch", "epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_rows % self.minibatch:
            raise ValueError(f"the {self.rollout_rows} sequences of a step do not split into minibatches of "
                             f"{self.minibatch}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for a stochastic policy, got {self.temperature}")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ValueError("kl_coef must be >= 0 and kl_target > 0")

    @property
    def rollout_rows(self) -> int:
        return self.prompts_per_step * (self.group_size if self.algo == "grpo" else 1)


@dataclass(frozen=True)
class StepStats:
    step: int
    reward: float          # mean reward of the step's completions
    kl: float              # mean over sequences of sum over tokens of log pi_old - log pi_ref
    entropy: float         # mean per-token entropy of the policy's distribution (temperature 1) over completions
    clip_frac: float       # fraction of token updates whose ratio was clipped
    value_loss: float      # PPO only (0 for GRPO)
    explained_var: float   # of the returns by the values, PPO only
    kl_coef: float         # the coefficient this step used
    rollout_tokens_per_s: float
    update_tokens_per_s: float
    seconds: float


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = x[mask]
    return np.where(mask, (x - values.mean()) / (values.std() + 1e-8), 0.0)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """(advantages, returns) over (R, T) per-token arrays; a completion is the masked positions of its
    row, contiguous, with value 0 after its last token."""
    advantages = np.zeros_like(rewards)
    last, next_value = np.zeros(len(rewards)), np.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = np.where(m, delta + gamma * lam * last, 0.0)
        advantages[:, t] = last
        next_value = np.where(m, values[:, t], 0.0)
    return advantages, advantages + values


class PPO:
    """The policy, its frozen reference and (PPO) value model, their optimizers and the prompt stream."""

    def __init__(self, model_cfg, init_params: np.ndarray, backend, config: PPOConfig, prompts: list,
                 reward_fn, codec, eval_prompts: list = ()):
        """eval_prompts: the held-out prompts evaluate() will be given (the models' T must hold them too)."""
        self.cfg, self.ops, self.config, self.codec, self.reward_fn = model_cfg, backend, config, codec, reward_fn
        self.prompts = list(prompts)
        self.prompt_tokens = [document_tokens(codec, p) for p in self.prompts]
        B = config.minibatch
        longest = max(len(document_tokens(codec, p)) for p in self.prompts + list(eval_prompts))
        self.T = longest + config.max_new_tokens - 1
        if self.T > model_cfg.max_seq_len:
            raise ValueError(f"prompts of up to {longest} tokens plus "
                             f"{config.max_new_tokens} new ones exceed the model's {model_cfg.max_seq_len} positions")
        adamw = AdamWConfig(lr=config.lr, grad_clip=config.grad_clip)
        self.policy = build_model(model_cfg, backend, B, self.T, init_params)
        self.policy_opt = ModelOptimizer(backend, self.policy, init_params, adamw)
        self.reference = family_of(model_cfg).Model(model_cfg, backend, B, self.T, init_params)
        self.value = self.value_opt = None
        if config.algo == "ppo":
            self.value = ScalarHeadModel(model_cfg, backend, B, self.T, init_params)
            self.value_opt = ModelOptimizer(backend, self.value, init_params, adamw)
        self.decoder = BatchedDecoder(self.policy)
        self._weights = backend.zeros((B, self.T), fp32=True)
        self._entropy = backend.zeros((B, self.T), fp32=True)
        self.rng = np.random.default_rng(config.seed)
        self.order, self.cursor = self.rng.permutation(len(self.prompts)), 0
        self.kl_coef = config.kl_coef
        self.step_count = 0

    # ---- rollouts --------------------------------------------------------------------------------------
    def _next_prompts(self) -> np.ndarray:
        """Indices of the next prompts_per_step prompts of a shuffled pass (reshuffled once used up)."""
        picked = []
        while len(picked) < self.config.prompts_per_step:
            if self.cursor == len(self.order):
                self.order, self.cursor = self.rng.permutation(len(self.prompts)), 0
            take = min(self.config.prompts_per_step - len(picked), len(self.order) - self.cursor)
            picked.extend(self.order[self.cursor:self.cursor + take])
            self.cursor += take
        return np.array(picked)

    def sample(self, prompt_tokens: list, rng, temperature: float):
        """(token rows (R, T + 1), prompt lengths, lengths, completion texts): one completion per prompt."""
        c, B = self.config, self.config.minibatch
        rows, prompt_lens, lengths, texts = [], [], [], []
        for start in range(0, len(prompt_tokens), B):
            chunk = prompt_tokens[start:start + B]
            r = generate(self.policy, self.decoder, chunk, c.max_new_tokens, self.codec.eot, rng, temperature,
                         c.top_k)
            rows.append(r.tokens)
            prompt_lens.append(r.prompt_lens)
            lengths.append(r.lengths)
            texts += [self.codec.decode(r.completion(i)) for i in range(len(chunk))]
        return np.concatenate(rows), np.concatenate(prompt_lens), np.concatenate(lengths), texts

    def evaluate(self, prompts: list, reward_fn=None, seed: int = 0) -> float:
        """The mean reward (the training reward's, or reward_fn's) of one sampled completion per prompt
        (a fixed seed: before and after compare the same draws)."""
        _, _, _, texts = self.sample([document_tokens(self.codec, p) for p in prompts], np.random.default_rng(seed),
                                     self.config.temperature)
        return float(checked_rewards(reward_fn or self.reward_fn, prompts, texts).mean())

    # ---- forwards over whole sequences ------------------------------------------------------------------
    def _logprobs(self, model, inputs, targets, entropy: bool = False):
        """Host log pi(target) (B, T) under `model` (0 where the target is masked), and each position's
        entropy when asked; leaves the trunk's activations for a backward."""
        batch = self.ops.set_batch(inputs, targets)
        model.forward_schedule(model.block_acts, model.attend, batch.tokens, model.p["wpe"][:model.T])
        model.lm_head_loss(batch.targets, 0.0, entropy=self._entropy if entropy else None)
        logp = -self.ops.to_numpy(model.acts["losses"]).astype(np.float64)
        return batch, logp, (self.ops.to_numpy(self._entropy).astype(np.float64) if entropy else None)

    # ---- one step --------------------------------------------------------------------------------------
    def step(self) -> StepStats:
        c, B, T = self.config, self.config.minibatch, self.T
        t0 = time.time()
        prompt_ids = self._next_prompts()
        if c.algo == "grpo":
            prompt_ids = np.repeat(prompt_ids, c.group_size)
        tokens, prompt_lens, lengths, texts = self.sample([self.prompt_tokens[i] for i in prompt_ids], self.rng,
                                                          c.temperature)
        scores = checked_rewards(self.reward_fn, [self.prompts[i] for i in prompt_ids], texts)
        t_rollout = time.time() - t0

        R = len(prompt_ids)
        inputs = tokens[:, :T]
        mask = completion_mask(prompt_lens, lengths, T)
        targets = np.where(mask, tokens[:, 1:], -1).astype(np.int32)
        old_logp, ref_logp, entropy, values = (np.zeros((R, T)) for _ in range(4))
        for start in range(0, R, B):
            rows = slice(start, start + B)
            _, old_logp[rows], entropy[rows] = self._logprobs(self.policy, inputs[rows], targets[rows], entropy=True)
            _, ref_logp[rows], _ = self._logprobs(self.reference, inputs[rows], targets[rows])
            if self.value is not None:
                values[rows] = self.ops.to_numpy(self.value.forward(inputs[rows]))
        kl_tokens = np.where(mask, old_logp - ref_logp, 0.0)

        if c.algo == "ppo":
            rewards = -self.kl_coef * kl_tokens
            rewards[np.arange(R), lengths - 2] += scores  # the input position predicting the last token
            values = np.where(mask, values, 0.0)
            advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
            if c.whiten:
                advantages = whiten(advantages, mask)
        else:
            groups = scores.reshape(-1, c.group_size)
            normalized = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-6)
            advantages = np.where(mask, normalized.reshape(-1, 1), 0.0)
            returns = None

        t1 = time.time()
        clipped_tokens, value_losses = 0.0, []
        for _ in range(c.epochs):
            for mb in self.rng.permutation(R).reshape(-1, B):
                clipped_tokens += self._policy_update(inputs[mb], targets[mb], mask[mb], old_logp[mb],
                                                      ref_logp[mb], advantages[mb])
                if self.value is not None:
                    value_losses.append(self._value_update(inputs[mb], mask[mb], values[mb], returns[mb]))
        t_update = time.time() - t1

        kl, kl_coef = float(kl_tokens.sum(axis=1).mean()), self.kl_coef
        if c.kl_target is not None:  # proportional control of the KL per sequence towards kl_target
            self.kl_coef *= 1.0 + np.clip(kl / c.kl_target - 1.0, -0.2, 0.2) * R / c.kl_horizon
        explained = 0.0
        if returns is not None:
            variance = returns[mask].var()
            explained = float(1.0 - (returns - values)[mask].var() / variance) if variance > 0 else 0.0
        self.step_count += 1
        return StepStats(self.step_count, float(scores.mean()), kl, float(entropy[mask].mean()),
                         clipped_tokens / (c.epochs * mask.sum()), float(np.mean(value_losses)) if value_losses else 0.0,
                         explained, kl_coef, float((lengths - prompt_lens).sum()) / max(t_rollout, 1e-9),
                         c.epochs * R * T / max(t_update, 1e-9), time.time() - t0)

    def _policy_update(self, inputs, targets, mask, old_logp, ref_logp, advantages) -> float:
        """One clipped-surrogate update on a minibatch; returns the number of clipped tokens."""
        c = self.config
        batch, logp, _ = self._logprobs(self.policy, inputs, targets)
        ratio = np.exp(logp - old_logp)
        clipped = mask & (((advantages > 0) & (ratio > 1 + c.clip)) | ((advantages < 0) & (ratio < 1 - c.clip)))
        n = mask.sum()
        # loss = -mean over tokens of min(ratio * A, clip(ratio) * A): d loss / d log pi = -ratio * A where
        # the unclipped term is the minimum, else 0; the weight on -log pi's gradient is its negative
        weights = np.where(mask & ~clipped, ratio * advantages, 0.0) / n
        if c.algo == "grpo":  # kl_coef * (r - log r - 1), r = pi_ref / pi: d / d log pi = kl_coef * (1 - r)
            weights -= np.where(mask, c.kl_coef * (1.0 - np.exp(ref_logp - logp)), 0.0) / n
        self.ops.from_numpy(weights.astype(np.float32), out=self._weights)
        self.policy.lm_head_loss(batch.targets, 1.0, weights=self._weights)
        self.policy.backward(batch)
        self.policy_opt.step(c.lr)
        return float(clipped.sum())

    def _value_update(self, inputs, mask, old_values, returns) -> float:
        """One clipped value-loss update on a minibatch; returns the loss."""
        c, n = self.config, mask.sum()
        v = self.ops.to_numpy(self.value.forward(inputs)).astype(np.float64)
        v_clipped = old_values + np.clip(v - old_values, -c.value_clip, c.value_clip)
        loss_plain, loss_clipped = (v - returns) ** 2, (v_clipped - returns) ** 2
        # 0.5 * max(plain, clipped): the gradient of whichever is larger (the clipped one's is 0 outside the clip)
        grad = np.where(loss_plain >= loss_clipped, v - returns,
                        (v_clipped - returns) * (np.abs(v - old_values) < c.value_clip))
        self.value.backward(self.ops.from_numpy(np.where(mask, grad, 0.0).astype(np.float32) / n))
        self.value_opt.step(c.lr)
        return float(0.5 * np.maximum(loss_plain, loss_clipped)[mask].mean())

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, out_dir: str):
        """The policy as an llm.c model file, and a state file with both optimizers, the value model, the
        KL coefficient, the prompt order and the RNG (a resumed run continues the same stream)."""
        arrays = {f"policy.{k}": v for k, v in self.policy_opt.state_arrays().items()}
        if self.value is not None:
            arrays.update({f"value.{k}": v for k, v in self.value_opt.state_arrays().items()})
            arrays["value.params"] = self.value.trunk.host_params()
        extra = {"kl_coef": self.kl_coef, "rng": self.rng.bit_generator.state, "order": self.order.tolist(),
                 "cursor": self.cursor, "algo": self.config.algo}
        params = self.policy.host_params()
        checkpoint.save_checkpoint(out_dir, self.step_count, 0, 1,
                                   lambda path: checkpoint.write_model(path, self.cfg, params),
                                   checkpoint.TrainingState(0, arrays, extra), lambda: None)

    def resume(self, out_dir: str, say=print) -> int | None:
        """Loads the newest usable checkpoint of out_dir (each newer unusable one reported); its step, or
        None when there is none."""
        for step in reversed(checkpoint.checkpoint_steps(out_dir)):
            problem = checkpoint.checkpoint_problem(out_dir, step)
            if problem is None:
                try:
                    state = checkpoint.load_training_state(out_dir, step, 0, 1, 0)
                    cfg, params = checkpoint.read_model(checkpoint.model_path(out_dir, step))
                    if cfg != self.cfg or state.extra.get("algo") != self.config.algo:
                        problem = f"it was written by another run (model {cfg}, algo {state.extra.get('algo')})"
                except (OSError, checkpoint.CheckpointError) as e:
                    problem = str(e)
            if problem is not None:
                say(f"resume: skipping the checkpoint of step {step}: {problem}")
                continue
            group = lambda prefix: {k[len(prefix):]: v for k, v in state.arrays.items() if k.startswith(prefix)}
            self.policy.load_params(params)
            self.policy_opt.load_state(group("policy."))
            if self.value is not None:
                self.value.trunk.load_params(state.arrays["value.params"])
                self.value_opt.load_state(group("value."))
            extra = state.extra
            self.kl_coef, self.cursor = extra["kl_coef"], extra["cursor"]
            self.order = np.array(extra["order"])
            self.rng.bit_generator.state = extra["rng"]
            self.step_count = step
            return step
        return None
