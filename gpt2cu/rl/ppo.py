"""PPO and GRPO on gpt2cu's models: rollouts with the KV cache, rewards, then epochs of minibatch updates
through the same ops and optimizer as pretraining.

    ppo = PPO(model_cfg, init_params, backend, PPOConfig(...), prompts, reward_fn, codec)
    stats = ppo.step()         # one rollout batch and its updates -> StepStats
    ppo.evaluate(prompts)      # mean reward of completions of held-out prompts
    ppo.save(out_dir) / ppo.resume(out_dir)

One step, three phases, each timed: `rollout` samples completions of a batch of prompts (rollout.py) and
scores them; `score` runs the policy and the frozen reference (the starting policy) over the sequences
for the old log-probabilities, the reference's, each token's entropy and (PPO) the values, and turns
them into advantages; `update` runs `epochs` passes of shuffled minibatches, one update each.

  PPO   per-token rewards -kl_coef * (log pi_old - log pi_ref) plus the sequence's reward at its last
        token; GAE(gamma, lambda) over the completion with the value head's values; advantages whitened;
        the clipped surrogate, plus vf_coef times the clipped value loss. kl_coef is fixed, or adapted
        towards kl_target (Ziegler et al. 2019: a proportional controller with horizon kl_horizon).
  GRPO  group_size completions per prompt; each completion's advantage is its reward normalized by its
        group's mean and standard deviation, for all its tokens; no value head; the KL to the reference
        is a loss term kl_coef * (r - log r - 1), r = pi_ref / pi (DeepSeekMath's estimator).

What an update costs per token is at most what a pretraining step costs (bench/bench_rl.py measures both):
  - The loss is 0 outside the completions, so the LM head (a quarter of a d12 step: three GEMMs over the
    vocabulary and the classifier) runs on the completion positions only, at most max_new_tokens a row:
    FlatModel.lm_head_loss_at gathers their final-norm rows, and scatters their gradient back into a d(lnf)
    that is 0 elsewhere. The trunk still runs over every position (the completions attend to the prompt).
    The score phase's forwards do the same.
  - The policy loss is a sum over completion tokens of f(log pi(token)), whose gradient is
    f'(log pi) * d log pi / d logits; the fused classifier's gradient of -log pi is (softmax - onehot),
    so it only needs each row's weight -f'(log pi) -- which depends on log pi under the current
    parameters. The classifier computes that weight itself, from the row's log pi and its terms (old
    log pi, advantage, reference log pi, KL coefficient: backends.base.PolicyLoss, numpy_ops.
    policy_weights), between its two passes over the row: the LM head runs once per update, as in
    pretraining, and never stores a probability tensor.
  - The value head is a scalar head on the policy's own trunk (reward_model.ScalarHead), not a separate
    model: its forward and backward are 2C multiply-adds and C + 1 gradients per token on the trunk's
    final-norm output (two ops; on CUDA kernels/scalar_head.cu, which reads only the completion rows,
    the others weighing 0), where a separate value model of the policy's size would double the
    update's work (a second trunk forward and backward per token). The price is that the value loss now shapes
    the policy's features too: vf_coef weighs it against the policy loss (0.1, as in Ziegler et al.'s
    and TRL's shared-trunk setups).
  - On CUDA the update's forward (trunk, LM head, value head with its loss and backward) and the
    trunk's backward are CUDA graphs, as the trainer's micro-step is, and the AdamW update is the
    trainer's graph. Per minibatch the host prepares the next one's tokens while the device works and
    waits only for the gradient norm (and, with a value head, reads its C + 1 gradients and writes its
    parameters back while the device is idle for that read), as in a pretraining step.
The score phase is two forwards per token (policy and reference, no backward); the rollout is
incremental decoding. Each phase's tokens/s is reported.

Data-parallel ranks (comm: dist.MPIComm on the numpy backend, NCCLComm on CUDA) run the step one rank
would run on the same global batch:
  - every rank holds the whole policy (ZeRO-0: AdamW all-reduces the gradients, ModelOptimizer the value
    head's) and draws the same prompts, prompt order and minibatch permutations from the shared RNG;
  - the rollout rows are split in contiguous shares (a GRPO group stays on one rank), and row i of the
    step samples with its own generator seeded by (seed, step, i), so its completion does not depend on
    which rank, or which other rows, it is sampled with; each rank computes its rows' rewards and scores;
  - the scored rows are all-gathered (R x T numbers per array, small beside a forward): GAE, the
    whitening, GRPO's group statistics, the KL controller and the logged statistics are then the same
    host arithmetic over the same arrays on every rank as on one;
  - each global minibatch of `minibatch` rows is split over the ranks, and its per-token normalization
    counts the whole minibatch's tokens (times the world size, which the gradient average divides out):
    the averaged gradient is one rank's gradient of the whole minibatch.
Bit-for-bit equality with one rank is not the claim: the ranks sum gradients in another order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import checkpoint
from ..dist import SingleProcess
from ..backends.base import POLICY_TERMS, VALUE_TERMS, PolicyLoss, ValueLoss
from ..backends.numpy_ops import policy_weights
from ..models import family_of
from ..optim import AdamWConfig
from .reward_model import ModelOptimizer, ScalarHead, build_model, rank_share
from .rewards import checked_rewards
from .rollout import BatchedDecoder, completion_mask, generate
from .text import document_tokens

ALGOS = ("ppo", "grpo")


@dataclass(frozen=True)
class PPOConfig:
    algo: str = "ppo"
    prompts_per_step: int = 32     # prompts sampled per step (GRPO: each group_size times)
    group_size: int = 4            # GRPO's completions per prompt
    minibatch: int = 16            # sequences per update, over all ranks (the model's B is its share)
    epochs: int = 2                # passes over each rollout batch
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    lr: float = 1e-5               # the policy's trunk and (PPO) its value head
    kl_coef: float = 0.05
    kl_target: float | None = None  # adapt kl_coef towards this KL per sequence (None: fixed)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2              # the ratio's clip range
    value_clip: float = 0.2
    vf_coef: float = 0.1           # PPO: the value loss's weight against the policy loss (shared trunk)
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
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")

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
    rollout_tokens_per_s: float  # completion tokens sampled (and scored by the reward) per second
    score_tokens_per_s: float    # positions (B * T) through the policy's and the reference's forwards per second
    update_tokens_per_s: float   # positions (B * T) per second over the epochs of updates, as pretraining counts
    seconds: float


@dataclass
class Rollouts:
    """A step's sequences laid out for the (B, T) models, and what the score phase adds."""
    inputs: np.ndarray       # (R, T) int32
    targets: np.ndarray      # (R, T) int32: the next token at completion positions, -1 elsewhere
    mask: np.ndarray         # (R, T) bool: the completion positions
    old_logp: np.ndarray = None   # (R, T) float64 host arrays from here on: log pi_old(target)
    ref_logp: np.ndarray = None   # log pi_ref(target)
    entropy: np.ndarray = None    # the policy's entropy at each position
    values: np.ndarray = None     # PPO: the value head's values (0 outside the mask)


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


def listed_positions(mask: np.ndarray, targets: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, their targets), int32, for FlatModel.lm_head_loss_at: K distinct flattened positions of mask's
    (B, T), its True ones in order, then False ones to fill K (their targets are -1: they add nothing)."""
    flat = mask.reshape(-1)
    scored = np.flatnonzero(flat)
    if len(scored) > K:
        raise ValueError(f"{len(scored)} completion positions in a minibatch of room for {K}")
    index = np.concatenate([scored, np.flatnonzero(~flat)[:K - len(scored)]]).astype(np.int32)
    return index, targets.reshape(-1)[index].astype(np.int32)


def row_generators(seed: int, rows, *key) -> list:
    """One generator per row index, seeded by (seed, *key, row): a row samples the same whatever the
    rank and the other rows it is decoded with."""
    return [np.random.default_rng([seed, *key, int(i)]) for i in rows]


def split_problem(config: PPOConfig, world_size: int) -> str | None:
    """Why config's global batch cannot be split over world_size ranks, or None."""
    if config.minibatch % world_size or config.prompts_per_step % world_size:
        return (f"--minibatch {config.minibatch} and --prompts-per-step {config.prompts_per_step} must both "
                f"split evenly over {world_size} ranks")
    return None


class PPO:
    """The policy (with, for PPO, its value head), its frozen reference, the optimizer and the prompt stream."""

    def __init__(self, model_cfg, init_params: np.ndarray, backend, config: PPOConfig, prompts: list,
                 reward_fn, codec, eval_prompts: list = (), comm=None):
        """eval_prompts: the held-out prompts evaluate() will be given (the models' T must hold them too).
        comm: the data-parallel ranks (default: a single process); every rank must call every method."""
        self.cfg, self.ops, self.config, self.codec, self.reward_fn = model_cfg, backend, config, codec, reward_fn
        self.comm = comm = comm or SingleProcess()
        if split_problem(config, comm.world_size):
            raise ValueError(split_problem(config, comm.world_size))
        self.prompts = list(prompts)
        self.prompt_tokens = [document_tokens(codec, p) for p in self.prompts]
        B = config.minibatch // comm.world_size  # this rank's share of a minibatch
        longest = max(len(document_tokens(codec, p)) for p in self.prompts + list(eval_prompts))
        self.T = longest + config.max_new_tokens - 1
        if self.T > model_cfg.max_seq_len:
            raise ValueError(f"prompts of up to {longest} tokens plus "
                             f"{config.max_new_tokens} new ones exceed the model's {model_cfg.max_seq_len} positions")
        self.policy = build_model(model_cfg, backend, B, self.T, init_params, comm)
        self.value_head = ScalarHead(self.policy) if config.algo == "ppo" else None
        self.policy_opt = ModelOptimizer(backend, self.policy, init_params,
                                         AdamWConfig(lr=config.lr, grad_clip=config.grad_clip), head=self.value_head)
        self.reference = family_of(model_cfg).Model(model_cfg, backend, B, self.T, init_params)
        self.decoder = BatchedDecoder(self.policy)
        # the LM head runs on the completion positions only (at most max_new_tokens a row): the loss is 0
        # everywhere else. Its inputs besides the tokens, at fixed addresses (the captured graphs read them):
        # the positions and their targets, the policy loss's terms; the value loss's are per position.
        self._scored = self.policy.listed_positions(B * config.max_new_tokens)
        self._entropy = backend.zeros((B * config.max_new_tokens,), fp32=True)
        self._policy_loss = PolicyLoss(backend.zeros((B * config.max_new_tokens, POLICY_TERMS), fp32=True),
                                       config.clip)
        self._value_loss = ValueLoss(backend.zeros((B, self.T, VALUE_TERMS), fp32=True), config.value_clip,
                                     config.vf_coef)
        self._update_forward = backend.graphed(self._policy_forward)
        self._update_backward = backend.graphed(self.policy.backward)
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
        """(token rows (R, T + 1), prompt lengths, lengths, completion texts): one completion per prompt, in
        batches of the model's B; rng: a Generator, or one per prompt."""
        c, B = self.config, self.policy.B
        rows, prompt_lens, lengths, texts = [], [], [], []
        for start in range(0, len(prompt_tokens), B):
            chunk = prompt_tokens[start:start + B]
            r = generate(self.policy, self.decoder, chunk, c.max_new_tokens, self.codec.eot,
                         rng if isinstance(rng, np.random.Generator) else rng[start:start + B], temperature,
                         c.top_k)
            rows.append(r.tokens)
            prompt_lens.append(r.prompt_lens)
            lengths.append(r.lengths)
            texts += [self.codec.decode(r.completion(i)) for i in range(len(chunk))]
        return np.concatenate(rows), np.concatenate(prompt_lens), np.concatenate(lengths), texts

    def evaluate(self, prompts: list, reward_fn=None, seed: int = 0) -> float:
        """The mean reward (the training reward's, or reward_fn's) of one sampled completion per prompt
        (fixed seeds: before and after compare the same draws); each rank samples and scores its share of
        the prompts, and the rewards are summed over the ranks."""
        share = rank_share(len(prompts), self.comm)
        mine = list(prompts[share])
        total = 0.0
        if mine:
            _, _, _, texts = self.sample([document_tokens(self.codec, p) for p in mine],
                                         row_generators(seed, range(share.start, share.stop), 1),
                                         self.config.temperature)
            total = float(checked_rewards(reward_fn or self.reward_fn, mine, texts).sum())
        return self.comm.all_reduce_scalar(total) / len(prompts)

    # ---- the score phase: forwards over whole sequences -------------------------------------------------
    def _forward(self, model, batch, dloss: float, policy=None, entropy=None):
        """The trunk over every position, the LM head over the listed ones (self._scored)."""
        model.forward_schedule(model.block_acts, model.attend, batch.tokens, model.position_rows(0, model.T))
        model.lm_head_loss_at(self._scored, dloss, policy=policy, entropy=entropy)

    def _list_positions(self, mask: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Writes the scored positions of B rows (listed_positions(mask)) and their targets into self._scored;
        returns the positions."""
        index, listed_targets = listed_positions(mask, targets, len(self._scored.index))
        self.ops.from_numpy(index, out=self._scored.index)
        self.ops.from_numpy(listed_targets, out=self._scored.targets)
        return index

    def _logprobs(self, model, batch, index, entropy: bool = False):
        """Host log pi(target) (B, T) under `model` (0 where the target is masked), and each position's
        entropy when asked (0 outside the completions), from the LM head on the listed positions `index`."""
        def spread(listed):
            out = np.zeros(model.B * model.T)
            out[index] = self.ops.to_numpy(listed)
            return out.reshape(model.B, model.T)
        self._forward(model, batch, 0.0, entropy=self._entropy if entropy else None)
        return -spread(self._scored.losses), (spread(self._entropy) if entropy else None)

    def score(self, rollouts: Rollouts) -> Rollouts:
        """Fills in the old and reference log-probabilities, the entropy and (PPO) the values."""
        B, shape = self.policy.B, rollouts.inputs.shape
        r = rollouts
        r.old_logp, r.ref_logp, r.entropy, r.values = (np.zeros(shape) for _ in range(4))
        for start in range(0, shape[0], B):
            rows = slice(start, start + B)
            batch = self.ops.set_batch(r.inputs[rows])
            index = self._list_positions(r.mask[rows], r.targets[rows])
            r.old_logp[rows], r.entropy[rows] = self._logprobs(self.policy, batch, index, entropy=True)
            if self.value_head is not None:
                r.values[rows] = self.ops.to_numpy(self.value_head.forward())
            r.ref_logp[rows], _ = self._logprobs(self.reference, batch, index)
        r.values = np.where(r.mask, r.values, 0.0)
        return r

    # ---- one step --------------------------------------------------------------------------------------
    def step(self) -> StepStats:
        c, T = self.config, self.T
        t0 = time.time()
        prompt_ids = self._next_prompts()
        if c.algo == "grpo":
            prompt_ids = np.repeat(prompt_ids, c.group_size)
        R = len(prompt_ids)
        share = rank_share(R, self.comm)  # whole GRPO groups: prompts_per_step splits evenly over the ranks
        mine = prompt_ids[share]
        tokens, prompt_lens, lengths, texts = self.sample(
            [self.prompt_tokens[i] for i in mine], row_generators(c.seed, range(share.start, share.stop), 0,
                                                                  self.step_count), c.temperature)
        scores = checked_rewards(self.reward_fn, [self.prompts[i] for i in mine], texts)
        t_rollout = time.time() - t0

        t1 = time.time()
        mask = completion_mask(prompt_lens, lengths, T)
        r = self.score(Rollouts(tokens[:, :T], np.where(mask, tokens[:, 1:], -1).astype(np.int32), mask))
        r, scores, prompt_lens, lengths = self._gather(r, scores, prompt_lens, lengths)
        mask = r.mask
        kl_tokens = np.where(mask, r.old_logp - r.ref_logp, 0.0)
        if c.algo == "ppo":
            rewards = -self.kl_coef * kl_tokens
            rewards[np.arange(R), lengths - 2] += scores  # the input position predicting the last token
            advantages, returns = gae(rewards, r.values, mask, c.gamma, c.lam)
            if c.whiten:
                advantages = whiten(advantages, mask)
        else:
            groups = scores.reshape(-1, c.group_size)
            normalized = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-6)
            advantages = np.where(mask, normalized.reshape(-1, 1), 0.0)
            returns = np.zeros_like(advantages)
        t_score = time.time() - t1

        t2 = time.time()
        clipped_tokens, value_loss = self.update(r, advantages, returns)
        t_update = time.time() - t2

        kl, kl_coef = float(kl_tokens.sum(axis=1).mean()), self.kl_coef
        if c.kl_target is not None:  # proportional control of the KL per sequence towards kl_target
            self.kl_coef *= 1.0 + np.clip(kl / c.kl_target - 1.0, -0.2, 0.2) * R / c.kl_horizon
        explained = 0.0
        if self.value_head is not None:
            variance = returns[mask].var()
            explained = float(1.0 - (returns - r.values)[mask].var() / variance) if variance > 0 else 0.0
        self.step_count += 1
        return StepStats(self.step_count, float(scores.mean()), kl, float(r.entropy[mask].mean()),
                         clipped_tokens / (c.epochs * mask.sum()), value_loss, explained, kl_coef,
                         float((lengths - prompt_lens).sum()) / max(t_rollout, 1e-9), R * T / max(t_score, 1e-9),
                         c.epochs * R * T / max(t_update, 1e-9), time.time() - t0)

    def _gather(self, r: Rollouts, scores, prompt_lens, lengths):
        """Every rank's scored rows, in row order, on every rank (one all-gather of the rows packed as
        float64, exact for the tokens and lengths too); one process keeps its arrays as they are."""
        comm, ops = self.comm, self.ops
        if not comm.communicates:
            return r, scores, prompt_lens, lengths
        per_token = (r.inputs, r.targets, r.mask, r.old_logp, r.ref_logp, r.entropy, r.values)
        per_row = (scores, prompt_lens, lengths)
        local = np.concatenate([a.astype(np.float64) for a in per_token] + [np.stack(per_row, axis=1)], axis=1)
        mine = ops.from_numpy(np.ascontiguousarray(local).reshape(-1))  # NCCL gathers device arrays
        every = ops.from_numpy(np.zeros(local.size * comm.world_size))
        comm.all_gather(mine, every)
        rows = ops.to_numpy(every).reshape(-1, local.shape[1])
        T = r.inputs.shape[1]
        inputs, targets, mask, old_logp, ref_logp, entropy, values = (rows[:, k * T:(k + 1) * T] for k in range(7))
        scores, prompt_lens, lengths = rows[:, 7 * T:].T
        gathered = Rollouts(inputs.astype(np.int32), targets.astype(np.int32), mask.astype(bool), old_logp, ref_logp,
                            entropy, values)
        return gathered, scores, prompt_lens.astype(np.int64), lengths.astype(np.int64)

    # ---- the update phase --------------------------------------------------------------------------------
    def update(self, r: Rollouts, advantages: np.ndarray, returns: np.ndarray) -> tuple[float, float]:
        """`epochs` passes of shuffled minibatches over scored rollouts, one update each; returns (the
        number of clipped token updates, the mean value loss over the minibatches (PPO; else 0)).
        As the trainer's steps: the next minibatch's tokens are prepared on the host while the device
        works, and per minibatch the host waits only for the gradient norm (ModelOptimizer.step); the
        statistics are summed on the device as each minibatch's forward leaves them, and read once at the
        end (the device would otherwise idle while the host counts)."""
        c, ops, comm = self.config, self.ops, self.comm
        share = rank_share(c.minibatch, comm)  # this rank's rows of every (global) minibatch
        minibatches = [mb for _ in range(c.epochs)
                       for mb in self.rng.permutation(len(r.inputs)).reshape(-1, c.minibatch)]
        head = self.value_head
        with ops.on_stream():  # per minibatch: its clipped token updates, its weighted value loss (PPO)
            stats = ops.xp.zeros((len(minibatches), 2))
        # every minibatch's scored positions and loss terms computed and uploaded at once: a copy from host
        # memory waits for the stream, so one per minibatch would stall the host behind each AdamW update
        inputs = [self.loss_inputs(r.mask[mb[share]], r.targets[mb[share]], r.old_logp[mb[share]],
                                   r.ref_logp[mb[share]], advantages[mb[share]], r.values[mb[share]],
                                   returns[mb[share]], r.mask[mb].sum() / comm.world_size)  # the ranks' average
                  for mb in minibatches]                                                # sums their shares
        index, targets, policy_terms = (ops.from_numpy(np.stack([x[i] for x in inputs])) for i in range(3))
        value_terms = None if head is None else ops.from_numpy(np.stack([x[3] for x in inputs]))
        staged = ops.prepare_batch(r.inputs[minibatches[0][share]])
        for k in range(len(minibatches)):
            self._accumulate(staged, index[k], targets[k], policy_terms[k], None if head is None else value_terms[k])
            with ops.on_stream():
                # the update's log pi(target) is -losses; the filling positions have advantage 0, so none
                # of them counts as clipped
                logp = -self._scored.losses.astype(np.float64)
                stats[k, 0] = policy_weights(logp, policy_terms[k], c.clip, xp=ops.xp)[1].sum()
                if head is not None:
                    stats[k, 1] = head.losses.sum(dtype=np.float64)
            if k + 1 < len(minibatches):
                staged = ops.prepare_batch(r.inputs[minibatches[k + 1][share]])
            self.policy_opt.step(c.lr)
        clipped, value_loss = ops.to_numpy(stats).sum(axis=0)
        clipped = comm.all_reduce_scalar(float(clipped))
        if head is None:
            return clipped, 0.0
        # each rank's sum over its rows is world_size times its share of the minibatches' value losses
        total = comm.all_reduce_scalar(float(value_loss))
        return clipped, total / (comm.world_size * len(minibatches))

    def _policy_forward(self, batch):
        """The update's forward: the trunk, then the LM head with the policy loss (its backward included),
        and for PPO the value head with its loss (its backward included: its d(lnf) onto the LM head's)."""
        self._forward(self.policy, batch, 1.0, policy=self._policy_loss)
        if self.value_head is not None:
            self.value_head.value_loss(self._value_loss)

    def loss_inputs(self, mask, targets, old_logp, ref_logp, advantages, old_values, returns, tokens=None):
        """What a minibatch's loss reads besides its tokens, on the host: the scored positions (listed_positions
        of mask) and their targets (K,) int32, the policy loss's terms at those (K, 4) fp32 (the clipped
        surrogate, GRPO's KL term) and for PPO the value loss's at every position (B, T, 3) fp32 (else None),
        each weighting its tokens for a mean over the completion tokens. tokens: the count the means divide
        by (default: mask's; on several ranks the whole minibatch's over the world size)."""
        c, n = self.config, mask.sum() if tokens is None else tokens
        kl = c.kl_coef if c.algo == "grpo" else 0.0
        index, listed_targets = listed_positions(mask, targets, len(self._scored.index))
        policy = np.stack([old_logp, advantages / n, ref_logp, np.where(mask, kl / n, 0.0)], axis=-1)
        value = None if self.value_head is None else np.stack([old_values, returns, mask / n], axis=-1)
        return (index, listed_targets, policy.reshape(-1, POLICY_TERMS)[index].astype(np.float32),
                None if value is None else value.astype(np.float32))

    def gradients(self, staged, mask, targets, old_logp, ref_logp, advantages, old_values, returns, tokens=None):
        """Accumulates into the policy's (and value head's) gradients those of a minibatch's loss (loss_inputs):
        staged: the minibatch's tokens from backend.prepare_batch. Returns the scored positions and the host
        policy terms at those; the value head's weighted value loss per position (PPO) is in value_head.losses."""
        index, targets, policy, value = self.loss_inputs(mask, targets, old_logp, ref_logp, advantages, old_values,
                                                         returns, tokens)
        ops = self.ops
        self._accumulate(staged, ops.from_numpy(index), ops.from_numpy(targets), ops.from_numpy(policy),
                         None if value is None else ops.from_numpy(value))
        return index, policy

    def _accumulate(self, staged, index, targets, policy_terms, value_terms):
        """The policy loss (and PPO's value loss) in one forward and one backward of the policy's trunk, from
        the scored positions, their targets and the loss terms already on the device: copied on the stream
        into the buffers the captured graphs read, so the host does not wait."""
        ops = self.ops
        with ops.on_stream():
            self._scored.index[...] = index
            self._scored.targets[...] = targets
            self._policy_loss.terms[...] = policy_terms
            if value_terms is not None:
                self._value_loss.terms[...] = value_terms
        batch = ops.upload_batch(staged)
        self._update_forward(batch)
        self._update_backward(batch)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, out_dir: str):
        """The policy as an llm.c model file (rank 0), and a state file per rank with its optimizer (the
        value head's parameters with it), the KL coefficient, the prompt order and the RNG (a resumed run
        continues the same stream). Every rank must call it."""
        arrays = {f"policy.{k}": v for k, v in self.policy_opt.state_arrays().items()}
        extra = {"kl_coef": self.kl_coef, "rng": self.rng.bit_generator.state, "order": self.order.tolist(),
                 "cursor": self.cursor, "algo": self.config.algo}
        params, comm = self.policy.host_params(), self.comm
        checkpoint.save_checkpoint(out_dir, self.step_count, comm.rank, comm.world_size,
                                   lambda path: checkpoint.write_model(path, self.cfg, params),
                                   checkpoint.TrainingState(0, arrays, extra), comm.barrier)

    def resume(self, out_dir: str, say=print) -> int | None:
        """Loads the newest checkpoint of out_dir every rank can use (each newer unusable one reported);
        its step, or None when there is none. A checkpoint of another world size raises
        checkpoint.RunMismatch (every older one would be refused alike). Every rank must call it."""
        comm = self.comm

        def mismatch(cfg, state):
            if cfg != self.cfg or state.extra.get("algo") != self.config.algo:
                return f"it was written by another run (model {cfg}, algo {state.extra.get('algo')})"
            return None
        found = checkpoint.newest_usable(
            out_dir, comm, 0, mismatch,
            lambda step, problem: say(f"resume: skipping the checkpoint of step {step}"
                                      + (f" (rank {comm.rank})" if comm.world_size > 1 else "") + f": {problem}"))
        if found is None:
            return None
        step, state, _, params = found
        group = lambda prefix: {k[len(prefix):]: v for k, v in state.arrays.items() if k.startswith(prefix)}
        self.policy.load_params(params)
        self.policy_opt.load_state(group("policy."))
        extra = state.extra
        self.kl_coef, self.cursor = extra["kl_coef"], extra["cursor"]
        self.order = np.array(extra["order"])
        self.rng.bit_generator.state = extra["rng"]
        self.step_count = step
        return step
