"""RL fine-tuning (gpt2cu/rl, python -m gpt2cu.reward / gpt2cu.ppo) on the numpy backend.

The pieces: the batched KV-cache decoder against full forwards, sampling, GAE, the scalar head's gradient,
the reward model file, checkpoint resume, the RL plot, and every bad input as one line with exit code 2.
Then the issue's two demonstrations, tiny: a model pretrained by the project on synthetic additions
(dev/data/arithmetic.py, python -m gpt2cu.train) is fine-tuned with an exact-match reward by PPO and by
GRPO, and held-out accuracy must rise clearly; a reward model learns a hidden preference rule (> 90%
held-out pairwise accuracy) and PPO on it raises the rule's rate on held-out prompts with a bounded KL.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2cu import ppo as ppo_cli
from gpt2cu import reward as reward_cli
from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.checkpoint import write_model
from gpt2cu.models import family_of
from gpt2cu.models.gpt2 import GPT, GPTConfig, init_params
from gpt2cu.models.llama import LlamaConfig
from gpt2cu.rl.ppo import gae
from gpt2cu.rl.reward_model import ScalarHeadModel, read_reward_model, write_reward_model
from gpt2cu.rl.rollout import BatchedDecoder, completion_mask, generate, sample_tokens
from gpt2cu.rl.text import CHAR_PADDED_VOCAB, CHAR_VOCAB, InputError

REPO = Path(__file__).resolve().parents[1]
TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=18, vocab_size=CHAR_VOCAB,
                 padded_vocab_size=CHAR_PADDED_VOCAB)
# LLaMA with grouped key/value heads (4 query heads over 2), RoPE and SwiGLU, in the same vocabulary
TINY_LLAMA = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, multiple_of=16, max_seq_len=18,
                         vocab_size=CHAR_VOCAB, padded_vocab_size=CHAR_PADDED_VOCAB)
EXACT_MATCH = "gpt2cu.rl.rewards:arithmetic_exact_match"


@pytest.fixture
def backend():
    return NumpyBackend()


# ---- pieces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TINY, TINY_LLAMA], ids=["gpt2", "llama"])
def test_batched_decoder_matches_full_forwards(backend, cfg):
    """Greedy rollouts of prompts of different lengths, decoded together over the KV cache, equal greedy
    decoding of each prompt alone by full forwards; for both model families (LLaMA's cache holds its
    key/value heads only, and each step rotates its one position)."""
    family = family_of(cfg)
    params = family.init_params(cfg, seed=3) * 10  # large weights: peaked, prompt-dependent logits
    eot = CHAR_VOCAB - 1
    prompts = [[eot, 3, 4, 5], [eot, 7, 8, 9, 10, 11, 12], [eot]]
    model = family.Model(cfg, backend, 3, 12, params)
    rollout = generate(model, BatchedDecoder(model), prompts, 6, eot, np.random.default_rng(0), temperature=0)
    single = family.Model(cfg, backend, 1, 12, params)
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        while len(seq) < rollout.lengths[row]:
            inputs = np.full((1, 12), eot, np.int32)
            inputs[0, :len(seq)] = seq
            single.forward(backend.set_batch(inputs))
            seq.append(int(np.argmax(single.logits(0, len(seq) - 1)[:CHAR_VOCAB])))
            if seq[-1] == eot:
                break
        assert seq == rollout.tokens[row, :rollout.lengths[row]].tolist()
        assert rollout.lengths[row] - len(prompt) <= 6
    # sampled at temperature 1: the kept log-probabilities are the model's, as a full forward gives them
    rollout = generate(model, BatchedDecoder(model), prompts, 6, eot, np.random.default_rng(1), temperature=1.0)
    mask = completion_mask(rollout.prompt_lens, rollout.lengths, 12)
    assert mask.sum() == (rollout.lengths - rollout.prompt_lens).sum()
    model.forward(backend.set_batch(rollout.tokens[:, :12], np.where(mask, rollout.tokens[:, 1:], -1)))
    np.testing.assert_allclose(rollout.logprobs[:, 1:][mask], -model.acts["losses"][mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_LLAMA], ids=["gpt2", "llama"])
def test_rows_with_their_own_generators_sample_alone_what_they_sample_together(backend, cfg):
    """With a generator per row (how data-parallel ranks split a batch), a row's completion does not depend
    on the rows it is decoded with: prompts of different lengths (the batch's prefill covers the shortest, so
    a longer prompt's row waits several steps) sample together what each samples alone."""
    family = family_of(cfg)
    params = family.init_params(cfg, seed=4) * 3
    eot = CHAR_VOCAB - 1
    prompts = [[eot, 3], [eot, 7, 8, 9, 10, 11], [eot, 5, 6, 7]]
    model = family.Model(cfg, backend, 3, 14, params)
    gens = lambda seeds: [np.random.default_rng(s) for s in seeds]  # noqa: E731
    together = generate(model, BatchedDecoder(model), prompts, 6, eot, gens([10, 11, 12]), temperature=1.0)
    for row, prompt in enumerate(prompts):
        alone = generate(model, BatchedDecoder(model), [prompt], 6, eot, gens([10 + row]), temperature=1.0)
        assert together.completion(row) == alone.completion(0), row


def test_sample_tokens_top_k_and_logprobs():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4, 30))
    tokens, logp = sample_tokens(np.repeat(logits, 500, axis=0), rng, temperature=0.7, top_k=3)
    top3 = np.argsort(logits, axis=1)[:, -3:]
    rows = np.repeat(np.arange(4), 500)
    assert all(t in top3[r] for r, t in zip(rows, tokens))
    z = logits / 0.7
    restricted = np.take_along_axis(z, top3, axis=1)
    expected = z[rows, tokens] - np.log(np.exp(restricted).sum(axis=1))[rows]
    np.testing.assert_allclose(logp, expected, rtol=1e-9)
    # the frequencies are the softmax's (20,000 draws of 7 tokens: standard error < 0.0036, bound 5 of them)
    small = rng.normal(0, 2, (1, 7))
    p = np.exp(small[0] - small.max())
    p /= p.sum()
    draws = sample_tokens(np.repeat(small, 20_000, axis=0), rng, temperature=1.0, top_k=None)[0]
    assert np.abs(np.bincount(draws, minlength=7) / 20_000 - p).max() < 0.018
    # a draw of exactly 0 still takes a token of positive probability (here the first is masked by top_k)
    zero = [SimpleNamespace(random=lambda: 0.0)]  # the row's own generator
    first_masked = np.array([[-5.0, 1.0, 2.0]])
    assert sample_tokens(first_masked, zero, temperature=1.0, top_k=2)[0][0] == 1


def test_gae_with_lambda_and_gamma_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    mask = np.zeros((3, 8), bool)
    mask[0, 2:6], mask[1, 0:8], mask[2, 5:6] = True, True, True
    advantages, returns = gae(np.where(mask, rewards, 0), np.where(mask, values, 0), mask, 1.0, 1.0)
    for r in range(3):
        idx = np.flatnonzero(mask[r])
        to_go = np.cumsum(rewards[r, idx][::-1])[::-1]
        np.testing.assert_allclose(returns[r, idx], to_go, rtol=1e-12)
        np.testing.assert_allclose(advantages[r, idx], to_go - values[r, idx], rtol=1e-12)
    assert (advantages[~mask] == 0).all()


def test_scalar_head_gradients_match_finite_differences(backend):
    """sum(c * values): the head's gradient and the trunk's (through d(lnf) into the model's backward)."""
    rng = np.random.default_rng(1)
    params = init_params(TINY, seed=1)
    head = rng.normal(0, 0.5, TINY.n_embd + 1).astype(np.float32)
    inputs = rng.integers(0, CHAR_VOCAB, (2, 6)).astype(np.int32)
    c = rng.normal(size=(2, 6)).astype(np.float32)
    model = ScalarHeadModel(TINY, backend, 2, 6, params, head)
    model.forward(inputs)
    model.backward(c)
    objective = lambda m: float((m.forward(inputs).astype(np.float64) * c).sum())
    eps = 1e-2
    for i in (0, TINY.n_embd):  # a weight and the bias
        probe = ScalarHeadModel(TINY, backend, 2, 6, params, head)
        probe.head[i] += eps
        up = objective(probe)
        probe.head[i] -= 2 * eps
        assert (up - objective(probe)) / (2 * eps) == pytest.approx(float(model.head_grad[i]), rel=1e-2)
    grads = model.trunk.grads
    for i in np.argsort(-np.abs(grads))[:3]:  # the trunk's largest gradients: well above float32 noise
        shifted = params.copy()
        shifted[i] += eps
        up = objective(ScalarHeadModel(TINY, backend, 2, 6, shifted, head))
        shifted[i] -= 2 * eps
        down = objective(ScalarHeadModel(TINY, backend, 2, 6, shifted, head))
        assert (up - down) / (2 * eps) == pytest.approx(float(grads[i]), rel=5e-2)


def test_reward_model_file_round_trip_and_truncation(tmp_path):
    params = init_params(TINY, seed=0)
    head = np.arange(TINY.n_embd + 1, dtype=np.float32)
    path = str(tmp_path / "rm.bin")
    write_reward_model(path, TINY, params, head)
    cfg, trunk, got_head = read_reward_model(path)
    assert cfg == TINY
    np.testing.assert_array_equal(trunk, params)
    np.testing.assert_array_equal(got_head, head)
    with open(path, "r+b") as f:
        f.truncate(Path(path).stat().st_size - 4)
    with pytest.raises(InputError, match="truncated"):
        read_reward_model(path)


@pytest.mark.parametrize("cfg", [TINY, TINY_LLAMA], ids=["gpt2", "llama"])
def test_lm_head_on_listed_positions_matches_the_whole_head(cfg):
    """lm_head_loss_at on the positions whose target is not -1 (and two filling ones) gives what
    lm_head_loss over every position gives: the listed losses, d(lnf) (0 off the list) and the head's
    gradient, within float32 rounding (the numpy backend's; the sums run in another order)."""
    from gpt2cu.rl.ppo import listed_positions
    backend, rng = NumpyBackend(), np.random.default_rng(5)
    B, T = 3, 11
    model = family_of(cfg).Model(cfg, backend, B, T, family_of(cfg).init_params(cfg, seed=3))
    inputs = rng.integers(0, CHAR_VOCAB, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.3
    targets = np.where(mask, rng.integers(0, CHAR_VOCAB, (B, T)), -1).astype(np.int32)
    batch = backend.set_batch(inputs)
    model.forward_schedule(model.block_acts, model.attend, batch.tokens, model.position_rows(0, T))
    model.lm_head_loss(targets, 0.5)
    whole = (model.acts["losses"].copy(), model.acts["dbtc"].copy(), backend.to_numpy(model.g[model.head]).copy())
    model.zero_grad()
    at = model.listed_positions(int(mask.sum()) + 2)
    index, listed_targets = listed_positions(mask, targets, len(at.index))
    at.index[...], at.targets[...] = index, listed_targets
    model.acts["dbtc"][...] = np.nan  # every position must be written
    model.lm_head_loss_at(at, 0.5)
    np.testing.assert_allclose(at.losses, whole[0].reshape(-1)[index], rtol=1e-5)
    np.testing.assert_allclose(model.acts["dbtc"], whole[1], rtol=1e-5, atol=1e-8)
    assert not model.acts["dbtc"].reshape(-1, cfg.n_embd)[~mask.reshape(-1)].any()
    np.testing.assert_allclose(backend.to_numpy(model.g[model.head]), whole[2], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="listed positions"):
        model.listed_positions(B * T + 1)


def update_minibatch(backend, algo, cfg=TINY):
    """A PPO over TINY with a random value head (one epoch of one minibatch per update), and a scored
    minibatch of rollouts, advantages and returns for its update: the old log-probabilities put each
    token's starting ratio at 0.5, 0.9, 1.1 or 1.6 and the old values sit 0.05 or 0.5 from the values
    (away from both clip boundaries, so finite differences see one branch)."""
    from gpt2cu.rl.ppo import PPO, PPOConfig, Rollouts
    from gpt2cu.rl.text import CharCodec
    rng = np.random.default_rng(2)
    params = init_params(cfg, seed=2)
    ppo = PPO(cfg, params, backend, PPOConfig(algo=algo, prompts_per_step=4, minibatch=4, epochs=1, max_new_tokens=4,
                                               kl_coef=0.3), ["10+10="] * 4, lambda p, c: [0.0] * len(c), CharCodec())
    if ppo.value_head is not None:
        backend.from_numpy(rng.normal(0.0, 0.2, cfg.n_embd + 1).astype(np.float32), out=ppo.value_head.params)
    B, T = 4, ppo.T
    inputs = rng.integers(0, CHAR_VOCAB, (B, T)).astype(np.int32)
    mask = completion_mask(np.array([7, 7, 5, 6]), np.array([11, 9, 9, 8]), T)
    targets = np.where(mask, rng.integers(0, CHAR_VOCAB, (B, T)), -1).astype(np.int32)
    r = ppo.score(Rollouts(inputs, targets, mask))
    pick = lambda choices: rng.choice(choices, size=(B, T))  # noqa: E731
    r.ref_logp = r.old_logp + rng.normal(0.0, 0.5, (B, T))
    r.old_logp = r.old_logp - np.log(pick([0.5, 0.9, 1.1, 1.6]))
    r.values = r.values + pick([-0.5, -0.05, 0.05, 0.5])
    return ppo, params, r, rng.normal(0.0, 1.0, (B, T)), rng.normal(0.0, 1.0, (B, T))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_update_gradients_match_finite_differences(backend, algo):
    """The update's one forward and backward (the policy loss weighted inside the fused classifier, the
    value head's loss added into the trunk's d(lnf)) give the gradients of the whole minibatch loss,
    written out here from a plain forward: PPO's clipped surrogate plus vf_coef times the clipped value
    loss, GRPO's surrogate plus its KL term, each a mean over completion tokens."""
    ppo, params, r, advantages, returns = update_minibatch(backend, algo)
    inputs, targets, mask, old_values = r.inputs, r.targets, r.mask, r.values
    old_logp, ref_logp = r.old_logp, r.ref_logp
    c, n, C = ppo.config, mask.sum(), TINY.n_embd
    kl = c.kl_coef if algo == "grpo" else 0.0
    head = ppo.value_head.host_params() if ppo.value_head is not None else None
    ppo.gradients(backend.prepare_batch(inputs), mask, targets, old_logp, ref_logp, advantages, old_values, returns)

    def objective(trunk_params, head_params):
        model = GPT(TINY, backend, *inputs.shape, trunk_params)
        model.forward(backend.set_batch(inputs, targets))
        logp = -model.acts["losses"].astype(np.float64)
        ratio, q = np.exp(logp - old_logp), np.exp(ref_logp - logp)
        loss = (-np.minimum(ratio * advantages, np.clip(ratio, 1 - c.clip, 1 + c.clip) * advantages)
                + kl * (q - np.log(q) - 1))
        if head_params is not None:
            v = model.acts["lnf"].astype(np.float64) @ head_params[:C] + head_params[C]
            v_clipped = old_values + np.clip(v - old_values, -c.value_clip, c.value_clip)
            loss += c.vf_coef * 0.5 * np.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
        return float(loss[mask].sum() / n)

    eps = 2e-3  # the clipped branches stay put; float32 objectives still resolve the differences
    grads = ppo.policy.grads
    for i in np.argsort(-np.abs(grads))[:4]:  # the largest: well above float32 noise
        up, down = params.copy(), params.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (objective(up, head) - objective(down, head)) / (2 * eps)
        assert numeric == pytest.approx(float(grads[i]), rel=5e-2), i
    if head is not None:
        for i in (0, 1, C):  # two weights and the bias
            up, down = head.copy(), head.copy()
            up[i] += eps
            down[i] -= eps
            numeric = (objective(params, up) - objective(params, down)) / (2 * eps)
            assert numeric == pytest.approx(float(ppo.value_head.grad[i]), rel=2e-2), i


class CountingBackend(NumpyBackend):
    """The numpy backend, counting each op of the ops table it runs."""
    def __init__(self):
        super().__init__()
        self.calls = {}


for _op in ("encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward", "matmul_forward",
            "matmul_backward", "attention_forward", "attention_backward", "gelu_forward", "gelu_backward",
            "fused_classifier", "global_norm_squared", "adamw_update", "lm_head_loss", "scalar_head_forward",
            "scalar_head_backward", "gather_rows", "scatter_rows"):
    def _counted(self, *args, _name=_op, **kwargs):
        self.calls[_name] = self.calls.get(_name, 0) + 1
        return getattr(super(CountingBackend, self), _name)(*args, **kwargs)
    setattr(CountingBackend, _op, _counted)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_update_runs_the_ops_of_a_pretraining_step(algo):
    """One update minibatch calls exactly the ops a pretraining step of the same model and (B, T) calls:
    one LM-head pass (matmul, classifier, matmul backward per chunk: the pretraining step's lm_head_loss op,
    the update's the three ops with its policy loss; the update's over the completion positions, gathered
    before and their gradient scattered after, once each), one trunk forward and
    backward, the norm and the AdamW update; PPO's value head adds its two ops (value with loss, its
    backward) and its own AdamW update on the device, once each."""
    from gpt2cu.data import InMemoryBatches
    from gpt2cu.dist import SingleProcess
    from gpt2cu.optim import AdamWConfig
    from gpt2cu.trainer import TrainConfig, Trainer
    backend = CountingBackend()
    ppo, params, r, advantages, returns = update_minibatch(backend, algo)
    B, T = r.inputs.shape
    backend.calls = {}
    ppo.update(r, advantages, returns)
    update_calls = backend.calls
    tokens = np.random.default_rng(0).integers(0, CHAR_VOCAB, (B, T + 1)).astype(np.int32)
    trainer = Trainer(TINY, params, backend, SingleProcess(),
                      TrainConfig(batch_size=B, seq_len=T, max_steps=1, recompute=0, adamw=AdamWConfig()),
                      InMemoryBatches([(tokens[:, :-1], tokens[:, 1:])]))
    backend.calls = {}
    trainer.step()
    pretraining_calls = dict(backend.calls)
    lm_head_chunks = pretraining_calls.pop("lm_head_loss", 0)
    for op in ("matmul_forward", "fused_classifier", "matmul_backward"):
        pretraining_calls[op] = pretraining_calls.get(op, 0) + lm_head_chunks
    head_ops = ("scalar_head_forward", "scalar_head_backward")
    head_calls = {op: update_calls.pop(op) for op in head_ops if op in update_calls}
    assert {op: update_calls.pop(op, 0) for op in ("gather_rows", "scatter_rows")} == {"gather_rows": 1,
                                                                                         "scatter_rows": 1}
    if algo == "ppo":
        update_calls["adamw_update"] -= 1  # the value head's
    assert lm_head_chunks >= 1 and update_calls == pretraining_calls
    assert head_calls == (dict.fromkeys(head_ops, 1) if algo == "ppo" else {})


# ---- bad input: one line, exit code 2 ----------------------------------------------------------------
@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A tiny character-vocabulary policy, a prompts file, and a module of broken reward functions in
    the current directory."""
    monkeypatch.chdir(tmp_path)
    write_model(str(tmp_path / "policy.bin"), TINY, init_params(TINY, seed=0))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(10, 18)))
    (tmp_path / "broken_rewards.py").write_text(
        "def too_few(prompts, completions):\n    return [1.0]\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run_ppo_cli(capsys, *flags):
    """(exit code, stdout, stderr) of python -m gpt2cu.ppo in this process."""
    try:
        code = ppo_cli.main(["--backend", "numpy", "--prompts-per-step", "4", "--minibatch", "4",
                             "--max-new-tokens", "3", *flags])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case, flags, message", [
    ("empty prompts", ["--prompts", "empty.jsonl", "--reward", EXACT_MATCH], "is empty"),
    ("not JSONL", ["--prompts", "text.jsonl", "--reward", EXACT_MATCH], "not JSON"),
    ("no prompt field", ["--prompts", "fields.jsonl", "--reward", EXACT_MATCH], "string fields prompt"),
    ("unimportable reward", ["--prompts", "prompts.jsonl", "--reward", "no_such_module:f"], "cannot import"),
    ("no such function", ["--prompts", "prompts.jsonl", "--reward", "broken_rewards:missing"], "no function"),
    ("wrong count", ["--prompts", "prompts.jsonl", "--reward", "broken_rewards:too_few"], "returned 1 rewards for 4"),
    ("NaN reward", ["--prompts", "prompts.jsonl", "--reward", "broken_rewards:nan"], "non-finite reward"),
    ("other vocabulary", ["--prompts", "prompts.jsonl", "--reward-model", "gpt2_vocab_rm.bin"], "vocabulary has 50257"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_run, capsys, case, flags, message):
    (tiny_run / "empty.jsonl").write_text("\n")
    (tiny_run / "text.jsonl").write_text("23+58=\n")
    (tiny_run / "fields.jsonl").write_text('{"text": "23+58="}\n')
    if case == "other vocabulary":
        cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, max_seq_len=18)  # GPT-2's vocabulary
        write_reward_model(str(tiny_run / "gpt2_vocab_rm.bin"), cfg, init_params(cfg), np.zeros(9, np.float32))
    code, _, err = run_ppo_cli(capsys, "--policy", "policy.bin", "--steps", "1", *flags)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err and err.startswith("python -m gpt2cu.ppo: error:"), err


def test_reward_cli_bad_pairs_file(tiny_run, capsys):
    (tiny_run / "pairs.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    with pytest.raises(SystemExit) as e:
        reward_cli.main(["--init", "policy.bin", "--pairs", "pairs.jsonl", "--val-pairs", "pairs.jsonl",
                         "-o", "rm.bin", "--backend", "numpy"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "prompt, chosen, rejected" in err


@pytest.mark.parametrize("cfg", [TINY, TINY_LLAMA], ids=["gpt2", "llama"])
def test_resume_continues_the_same_run(tiny_run, capsys, cfg):
    """Steps 1-2, a checkpoint, then -y 1 to step 4 give the policy of an uninterrupted 4-step run, bit for bit
    (PPO: the value head, the optimizer, the prompt order and the RNG are in the checkpoint); a LLaMA policy
    (llm.c's LLaMA model file) as well as GPT-2's."""
    write_model(str(tiny_run / "policy.bin"), cfg, family_of(cfg).init_params(cfg, seed=0))
    # 16 sequences per step: the untrained policy ends about 1 completion in 12 with an even digit, and a
    # step whose rewards are all 0 does not move it
    common = ["--policy", "policy.bin", "--prompts", "prompts.jsonl", "--reward", "gpt2cu.rl.rewards:even_last_digit",
              "--lr", "1e-2", "--prompts-per-step", "16"]
    assert run_ppo_cli(capsys, *common, "--steps", "4", "-o", "whole")[0] == 0
    assert run_ppo_cli(capsys, *common, "--steps", "2", "-o", "parts")[0] == 0
    code, out, _ = run_ppo_cli(capsys, *common, "--steps", "4", "-o", "parts", "-y", "1")
    assert code == 0 and "resumed at step 2" in out
    whole = (tiny_run / "whole" / "model_00000004.bin").read_bytes()
    assert whole == (tiny_run / "parts" / "model_00000004.bin").read_bytes()
    assert whole != (tiny_run / "policy.bin").read_bytes()


def test_plot_reads_and_draws_the_rl_fields(tiny_run, capsys):
    pytest.importorskip("matplotlib")
    from gpt2cu.plot import plot_runs, read_log
    assert run_ppo_cli(capsys, "--policy", "policy.bin", "--prompts", "prompts.jsonl", "--reward", EXACT_MATCH,
                       "--steps", "3", "-o", "run")[0] == 0
    series = read_log(str(tiny_run / "run" / "main.log"))
    assert [s for s, _ in series["kl"]] == [1, 2, 3] and len(series["ev"]) == 3
    plot_runs({"run": series}, str(tiny_run / "rl.png"))
    assert (tiny_run / "rl.png").stat().st_size > 0


# ---- the two demonstrations -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """dev/data/arithmetic.py's data and a 2-layer model pretrained on it by python -m gpt2cu.train
    (1000 steps, ~20 s): held-out accuracy ~10-20% when sampled, the rest of the way left to RL."""
    d = tmp_path_factory.mktemp("arithmetic")
    subprocess.run([sys.executable, str(REPO / "dev" / "data" / "arithmetic.py"), "--output", str(d),
                    "--depth", "2", "--channels", "64", "--train-docs", "60000"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "gpt2cu.train", "--backend", "numpy", "-e", str(d / "init_model.bin"),
                    "-i", str(d / "arithmetic_train_*.bin"), "-j", str(d / "arithmetic_val_*.bin"), "-b", "32",
                    "-t", "18", "-x", "1000", "-l", "3e-3", "-u", "20", "-s", "0", "-v", "0", "-n", "1000",
                    "-o", str(d / "pretrain")], check=True, capture_output=True, cwd=REPO)
    return d


def held_out_rewards(out: str) -> tuple[float, float]:
    before, after = re.search(r"held-out mean reward: ([\d.]+) -> ([\d.]+)", out).groups()
    return float(before), float(after)


def rl_flags(d, *flags):
    return ["--policy", str(d / "pretrain" / "model_00001000.bin"), "--prompts", str(d / "prompts_train.jsonl"),
            "--eval-prompts", str(d / "prompts_heldout.jsonl"), "--eval-every", "60", "--steps", "60",
            "--minibatch", "32", "--lr", "1e-3", *flags]


@pytest.mark.parametrize("algo, flags, gain", [
    ("ppo", ["--prompts-per-step", "64", "--kl-coef", "0.02"], 0.25),
    # GRPO learns only from groups whose rewards differ (most start at ~8% accuracy), so its gain depends on
    # how many such groups a step draws: with 16 prompts a step, seeds 1-6 and 42 gave +0.07..+0.32; with 32 (about
    # 3 s on a CPU), seeds 42 and 1-5 gave +0.38..+0.60
    ("grpo", ["--prompts-per-step", "32", "--group-size", "4", "--kl-coef", "0.02"], 0.15),
])
def test_demo_arithmetic_exact_match(arithmetic, capsys, tmp_path, algo, flags, gain):
    code, out, _ = run_ppo_cli(capsys, *rl_flags(arithmetic, "--algo", algo, "--reward", EXACT_MATCH, *flags,
                                                 "-o", str(tmp_path / algo)))
    before, after = held_out_rewards(out)
    print(f"{algo}: held-out accuracy {before:.3f} -> {after:.3f}")
    assert code == 0 and after >= before + gain, out


def test_demo_preference_rule(arithmetic, capsys, tmp_path):
    """The hidden rule (the chosen answer ends with an even digit) is learned from pairs; PPO on the reward
    model raises the rule's rate on held-out prompts, while the adaptive KL coefficient holds the KL to the
    reference near its target of 1 nat per sequence."""
    d, rm = arithmetic, str(tmp_path / "rm.bin")
    assert reward_cli.main(["--init", str(d / "pretrain" / "model_00001000.bin"), "--pairs", str(d / "pairs_train.jsonl"),
                            "--val-pairs", str(d / "pairs_heldout.jsonl"), "-o", rm, "--steps", "60",
                            "--lr", "1e-3", "--backend", "numpy"]) == 0
    accuracy = float(re.search(r"held-out pairwise accuracy: [\d.]+ -> ([\d.]+)", capsys.readouterr().out).group(1))
    assert accuracy > 0.9
    code, out, _ = run_ppo_cli(capsys, *rl_flags(d, "--reward-model", rm, "--eval-reward",
                                                 "gpt2cu.rl.rewards:even_last_digit", "--prompts-per-step", "64",
                                                 "--kl-coef", "0.1", "--kl-target", "1", "--kl-horizon", "640",
                                                 "-o", str(tmp_path / "ppo")))
    before, after = held_out_rewards(out)
    kl = [float(line.split("kl:")[1]) for line in (tmp_path / "ppo" / "main.log").read_text().split("\n")
          if "kl:" in line]
    print(f"reward model accuracy {accuracy:.3f}; even-ending rate {before:.3f} -> {after:.3f}; "
          f"KL max {max(kl):.3f}, last 10 steps {np.mean(kl[-10:]):.3f}")
    assert code == 0 and after >= before + 0.25, out
    assert max(kl) < 5.0 and np.mean(kl[-10:]) < 2.0


@pytest.mark.gpu
def test_ppo_value_head_on_cuda_matches_numpy(cuda_backend):
    """PPO's update on CUDA, its value head (kernels/scalar_head.cu) inside the forward's CUDA graph: the
    value head's gradient and the value loss of one minibatch equal the numpy backend's within the bf16
    trunk's precision (test_cuda_ops.py's MODEL_REL, 5e-2), the eager call, the capture and a replay
    alike; the replay repeats the capture's bits. (Head size 64: the attention kernel's.)"""
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=64, max_seq_len=18, vocab_size=CHAR_VOCAB,
                    padded_vocab_size=CHAR_PADDED_VOCAB)
    results = {}
    for name, backend in (("numpy", NumpyBackend()), ("cuda", cuda_backend)):
        ppo, _, r, advantages, returns = update_minibatch(backend, "ppo", cfg)
        runs = []
        for _ in range(3 if name == "cuda" else 1):  # eager, captured, replayed
            ppo.policy.zero_grad()
            backend.zero_(ppo.value_head.grad)
            ppo.gradients(backend.prepare_batch(r.inputs), r.mask, r.targets, r.old_logp, r.ref_logp, advantages,
                          r.values, returns)
            runs.append((backend.to_numpy(ppo.value_head.grad).astype(np.float64),
                         float(backend.to_numpy(ppo.value_head.losses).astype(np.float64).sum()),
                         backend.to_numpy(ppo.policy.grads).astype(np.float64)))
        results[name] = runs
    (ref_grad, ref_loss, ref_trunk), = results["numpy"]
    for grad, loss, trunk in results["cuda"]:
        assert np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad) < 5e-2
        assert loss == pytest.approx(ref_loss, rel=5e-2)
        # the trunk's: the LM head on the gathered completion rows, its d(lnf) scattered back (kernels/rows.cu)
        assert np.linalg.norm(trunk[:ref_trunk.size] - ref_trunk) / np.linalg.norm(ref_trunk) < 5e-2
    assert np.array_equal(results["cuda"][1][0], results["cuda"][2][0])
    assert np.array_equal(results["cuda"][1][2], results["cuda"][2][2])


@pytest.mark.gpu
def test_ppo_and_reward_model_run_on_cuda(cuda_backend):
    """The CUDA backend runs the rollouts, PPO's updates (the policy loss in the classifier, the value head,
    CUDA graphs) and a Bradley-Terry step: finite statistics, a policy that moved. (Head size 64: the
    attention kernel's.)"""
    from gpt2cu.optim import AdamWConfig
    from gpt2cu.rl.ppo import PPO, PPOConfig
    from gpt2cu.rl.reward_model import ModelOptimizer, bradley_terry_step
    from gpt2cu.rl.rewards import even_last_digit
    from gpt2cu.rl.text import CharCodec
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=64, max_seq_len=18, vocab_size=CHAR_VOCAB,
                    padded_vocab_size=CHAR_PADDED_VOCAB)
    params = init_params(cfg, seed=0)
    prompts = [f"{a}+{a}=" for a in range(10, 26)]
    ppo = PPO(cfg, params, cuda_backend, PPOConfig(prompts_per_step=8, minibatch=8, max_new_tokens=3, lr=1e-2),
              prompts, even_last_digit, CharCodec())
    stats = [ppo.step() for _ in range(2)]
    assert all(np.isfinite([s.kl, s.entropy, s.value_loss, s.explained_var]).all() for s in stats)
    assert not np.array_equal(ppo.policy.host_params(), ppo.reference.host_params())
    model = ScalarHeadModel(cfg, cuda_backend, 4, 9, params)
    eot = CHAR_VOCAB - 1
    pairs = [([eot, 3, 4, 5, eot], [eot, 3, 4, 6, eot]), ([eot, 7, eot], [eot, 8, 9, eot])]
    optimizer = ModelOptimizer(cuda_backend, model.trunk, params, AdamWConfig(lr=1e-3), head=model.scalar_head)
    loss, _ = bradley_terry_step(model, optimizer, pairs, eot, 1e-3)
    assert np.isfinite(loss) and np.abs(model.host_head()).sum() > 0
