"""The KV-cache decoders' kernels on CUDA against their numpy references: decode_attention
(kernels/decode_attention.cu vs numpy_ops.decode_attention) and sample_logits (kernels/sample.cu vs
numpy_ops.sample_logits), then the batched RL decoder (gpt2cu/rl/rollout.py) over them against the full
forward, and its speed (printed; run with -s). GPU only. Method and bounds as test_cuda_ops.py: fresh
inputs (seed printed, GPT2CU_TEST_SEED replays), rounded to bf16 so both sides see the same numbers, the
reference in float64, outputs poisoned with NaN.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from gpt2cu.backends import numpy_ops as ref_ops
from test_cuda_ops import BF16_REL, bf16_ulp, bits_of, case, cp, cuda, decode, poisoned, raw, to_host  # noqa: F401

pytestmark = pytest.mark.gpu
BF16_NEG_INF = 0xFF80


# ---- decode_attention ------------------------------------------------------------------------------------
# (B, n, NH, NKV, HS, capacity): n and B dividing nothing, GQA, HS 64 and 128 (the models'), 16 and 6 (tiny
# heads; 6 takes the scalar-load path), one position, and a cache long enough to need the shared memory
# opt-in (n = 13000: 53 KB of scores)
ATTENTION_SHAPES = [(16, 513, 12, 12, 64, 600), (3, 1000, 8, 2, 128, 1031), (5, 1, 4, 2, 128, 7),
                    (7, 77, 2, 1, 16, 77), (2, 33, 3, 3, 6, 40), (1, 13000, 2, 1, 64, 13000)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}-n{}-NH{}-NKV{}-HS{}-cap{}".format(*s))
def test_decode_attention(cuda, case, shape):
    """Every sequence's last query against its cached rows of a longer cache (the decoders pass a view of
    the first n of `capacity` positions). fp32 scores, softmax and sums, rounded to bf16 once: each
    element within one bf16 ulp of the float64 reference plus 2^-13 of the largest output (fp32 sums of up
    to 13000 terms: ~sqrt(n) * 2^-24 relative expected, n * 2^-24 at worst), and BF16_REL over the output."""
    B, n, NH, NKV, HS, capacity = shape
    width = (NH + 2 * NKV) * HS
    cache, cache_d = case.bf16((B, capacity, width), std=1.5)  # scores of std ~2: softmaxes both flat and peaked
    out = poisoned((B, 1, NH * HS))
    cuda.decode_attention(out, cache_d[:, :n], NH, NKV)
    ref = np.full((B, 1, NH * HS), np.nan)
    ref_ops.decode_attention(ref, cache[:, :n], NH, NKV)
    got = to_host(out)
    case.check("out", got, ref, BF16_REL)
    bound = bf16_ulp(np.abs(ref)) + 2.0 ** -13 * np.abs(ref).max()
    worst = np.abs(got - ref) / bound
    assert worst.max() <= 1, case.where(f"element {np.unravel_index(worst.argmax(), ref.shape)} off by "
                                        f"{worst.max():.2f} of its bound")
    rerun = poisoned((B, 1, NH * HS))
    cuda.decode_attention(rerun, cache_d[:, :n], NH, NKV)
    case.same_bits("out (second run)", raw(rerun), raw(out))


# ---- sample_logits -------------------------------------------------------------------------------------
def sample_reference(x, uniforms, temperature, top_k):
    """numpy_ops.sample_logits on host values x (R, V): (tokens, log-probs, the float64 cumulative mass)."""
    R, V = x.shape
    tokens, logp = np.zeros(R, np.int64), np.zeros(R)
    ref_ops.sample_logits(tokens, logp, x, uniforms, V, temperature, top_k)
    z = x / temperature if temperature else x.copy()
    if top_k is not None and top_k < V:
        z[x < np.sort(x, axis=1)[:, -top_k][:, None]] = -np.inf
    cdf = np.cumsum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)
    return tokens, logp, cdf


def run_sampler(cuda, x, Vp, uniforms, temperature, top_k):
    R, V = x.shape
    logits = np.full((R, 1, Vp), 0.0)
    logits[:, 0, :V] = x
    logits[:, 0, V:] = 1e4  # padded columns, never to be picked or counted
    tokens, logp = cp.full(R, -1, np.int32), poisoned(R, fp32=True)
    cuda.sample_logits(tokens, logp, cp.asarray(bits_of(logits)), uniforms, V, temperature, top_k)
    return raw(tokens).astype(np.int64), raw(logp).astype(np.float64)


def awkward_logits(case, R, V):
    """Normal logits (std 2) rounded to bf16, with rows of -inf and -inf-like entries, a tie for the max and
    ties at the top-50 boundary."""
    x = case.normal((R, V), std=2.0)
    x[0, ::3] = -np.inf                                         # bf16 -inf
    x[1, :] = -3.0e38                                           # -inf-like everywhere but 3 tokens
    x[1, [5, V // 2, V - 1]] = [1.0, 2.0, 1.5]
    x[2, [7, V - 2]] = x[2].max() + 1.0                         # two equal maxima: greedy takes the first
    x[3, case.rng.choice(V, 15, replace=False)] = np.sort(x[3])[-50]  # 16 tokens share the 50th value
    return decode(bits_of(x))


@pytest.mark.parametrize("V, Vp", [(50257, 50304), (1001, 1024), (7, 8)])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("top_k", [None, 1, 50])
def test_sample_logits_matches_the_reference(cuda, case, V, Vp, temperature, top_k):
    """The same token as numpy's float64 inverse CDF for the same draw, except for a draw within fp32
    rounding of a boundary between two tokens (the kernel's prefix sums are fp32 and blockwise, the
    reference's float64 and sequential: at most ~1e-5 of the mass apart), which may take the neighbour;
    log-probabilities within fp32 error (z/T and log of a sum of up to 50257 terms: ~1e-5); greedy exact,
    ties to the first. Draws of 0 and of nearly 1 (rounding to 1.0 in float32) still take kept tokens.
    (A mismatch takes a draw within ~1e-6 of a boundary: ~1e-5 of the draws at most; 2 of 37 allowed.)"""
    R = 37
    x = awkward_logits(case, R, V) if V > 100 else case.normal((R, V), std=2.0)
    uniforms = case.rng.random(R)
    uniforms[-2:] = 0.0, 1.0 - 2.0 ** -30
    uniforms = uniforms.astype(np.float32).astype(np.float64)  # as the kernel gets them
    got, got_logp = run_sampler(cuda, x, Vp, uniforms, temperature, top_k)
    want, want_logp, cdf = sample_reference(x, np.minimum(uniforms, 1.0 - 2.0 ** -53), temperature, top_k)
    assert ((0 <= got) & (got < V)).all(), case.where(f"tokens out of range: {got}")
    if temperature == 0:
        np.testing.assert_array_equal(got, want, err_msg=case.where("greedy tokens"))
        assert (got_logp == 0).all()
        return
    kept = x >= (np.sort(x, axis=1)[:, -top_k][:, None] if top_k is not None and top_k < V else -np.inf)
    assert kept[np.arange(R), got].all(), case.where("a token outside the top-k was sampled")
    mass = np.diff(cdf, axis=1, prepend=0.0)
    assert (mass[np.arange(R), got] > 0).all(), case.where("a token of probability 0 was sampled")
    for r in np.flatnonzero(got != want):
        # the draw lies within fp32 rounding (1e-5 of the mass) of the kernel's token's interval of the CDF
        target, below = uniforms[r] * cdf[r, -1], cdf[r, got[r] - 1] if got[r] else 0.0
        miss = max(below - target, target - cdf[r, got[r]], 0.0) / cdf[r, -1]
        assert miss < 1e-5, case.where(f"row {r}: token {got[r]} vs {want[r]}, the draw {miss:.2e} of the mass away")
    assert (got != want).sum() <= 2, case.where(f"{(got != want).sum()} of {R} draws differ")
    same = got == want
    np.testing.assert_allclose(got_logp[same], want_logp[same], rtol=1e-5, atol=2e-5,
                               err_msg=case.where("log-probabilities"))


def test_sample_logits_frequencies(cuda, case):
    """Over 40,000 rows of the same logits, each token's frequency is its probability (standard error
    < 0.0025; bound 5 of them), with top_k = 3 keeping all five tokens tied at the third value and
    nothing else."""
    x = np.array([[3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -2.0]])
    rows = 40_000
    for top_k, keep in ((None, 9), (3, 7)):
        z = x[0, :keep]
        p = np.exp(z - z.max())
        p /= p.sum()
        got, logp = run_sampler(cuda, np.repeat(x, rows, axis=0), 16, case.rng.random(rows), 1.0, top_k)
        freq = np.bincount(got, minlength=9) / rows
        assert np.abs(freq[:keep] - p).max() < 0.0125, case.where(f"top_k {top_k}: {freq} vs {p}")
        assert freq[keep:].sum() == 0, case.where(f"top_k {top_k}: masked tokens sampled")
        np.testing.assert_allclose(logp, np.log(p[got]), rtol=1e-5, atol=1e-6)


# ---- the batched decoder ---------------------------------------------------------------------------------
def decoder_models(cuda, family_name):
    from gpt2cu.models.gpt2 import GPT, GPTConfig, init_params
    from gpt2cu.models.llama import Llama, LlamaConfig
    from gpt2cu.models.llama import init_params as llama_init
    if family_name == "gpt2":
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=64)
        params = init_params(cfg, seed=2)
        params += np.random.default_rng(2).normal(0, 0.08, params.shape).astype(np.float32)
        return cfg, lambda B: GPT(cfg, cuda, B, 64, params)
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, max_seq_len=64, vocab_size=1000,
                      padded_vocab_size=1024)
    params = llama_init(cfg, seed=1) * 4
    return cfg, lambda B: Llama(cfg, cuda, B, 64, params)


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_batched_decoder_logits_match_the_full_forward(cuda, family_name):
    """Rows of different prompt lengths decoded together (teacher forcing past the shortest), through
    decode_attention: at every step each row's logits within bf16 tolerance of a full forward of that row's
    prefix (test_gpu_sample.py's bound: 2e-2 of the largest logit), GQA and RoPE included for LLaMA."""
    from gpt2cu.rl.rollout import BatchedDecoder
    from gpt2cu.sample import recompute_logits
    cfg, make = decoder_models(cuda, family_name)
    B, steps = 3, 40
    decoder, full = BatchedDecoder(make(B)), make(1)
    seqs = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, 64)).astype(np.int32)
    start = 5
    decoder.prefill(seqs, start)
    for pos in range(start, start + steps):
        logits = decoder.logits()
        for r in range(B):
            want = recompute_logits(full, cuda, list(seqs[r, :pos]))
            scale = float(np.abs(want).max())
            err = float(np.abs(logits[r] - want).max())
            assert err <= 2e-2 * scale, f"row {r}, position {pos}: {err:.4g} vs max |logit| {scale:.4g}"
        decoder.step(seqs[:, pos])


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_batched_decoder_graph_replays_equal_the_eager_steps(cuda, family_name):
    """A position's step runs eagerly, then is captured as a CUDA graph, then replayed (backend.graphed): the
    three passes over the same positions give the same logits to the bit, also after the cache was filled
    with other sequences in between (a replay reads the cache, it does not carry stale values)."""
    from gpt2cu.rl.rollout import BatchedDecoder
    cfg, make = decoder_models(cuda, family_name)
    decoder = BatchedDecoder(make(3))
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, cfg.vocab_size, (3, 64)).astype(np.int32)
    other = rng.integers(0, cfg.vocab_size, (3, 64)).astype(np.int32)

    def run(tokens):
        decoder.prefill(tokens, 6)
        logits = []
        for pos in range(6, 20):
            decoder.step(tokens[:, pos])
            logits.append(raw(decoder.top["logits"]))
        return np.stack(logits)

    eager, captured, _, replayed = run(seqs), run(seqs), run(other), run(seqs)
    assert (captured == eager).all() and (replayed == eager).all()


def test_rollouts_on_cuda(cuda):
    """generate() over the device sampler: greedy completions are the full forward's argmax wherever the
    top-2 gap is clear; sampled rollouts with per-row generators repeat exactly, and their kept
    log-probabilities are the ones the sampler's distribution gives the chosen tokens (top-k 50)."""
    from gpt2cu.rl.rollout import BatchedDecoder, generate
    from gpt2cu.sample import recompute_logits
    cfg, make = decoder_models(cuda, "gpt2")
    model, full = make(4), make(1)
    decoder, eot = BatchedDecoder(model), 50256
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 50000, n)) for n in (3, 9, 1, 20)]
    greedy = generate(model, decoder, prompts, 12, eot, rng, temperature=0)
    for r, prompt in enumerate(prompts):
        seq = list(prompt)
        for token in greedy.tokens[r, len(prompt):greedy.lengths[r]]:
            want = recompute_logits(full, cuda, seq)
            top2 = np.sort(want)[-2:]
            if top2[1] - top2[0] > 4e-2 * np.abs(want).max():
                assert token == int(np.argmax(want)), f"row {r} at {len(seq)}"
            seq.append(int(token))
    gens = lambda: [np.random.default_rng(s) for s in range(4)]  # noqa: E731
    a = generate(model, decoder, prompts, 12, eot, gens(), temperature=0.7, top_k=50)
    b = generate(model, decoder, prompts, 12, eot, gens(), temperature=0.7, top_k=50)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    checked = 0
    for r, prompt in enumerate(prompts):  # the kept log-probabilities against the full forward's logits
        seq = list(prompt)
        for pos in range(len(prompt), a.lengths[r]):
            want = recompute_logits(full, cuda, seq)
            z = want.astype(np.float64) / 0.7
            kth = np.sort(z)[-50]
            token = int(a.tokens[r, pos])
            # cached and full logits differ by <= 2e-2 of the largest: log-probs by twice that over 0.7
            if z[token] > kth + 4e-2 * np.abs(want).max() / 0.7:
                kept = z[z >= kth]
                expected = z[token] - kept.max() - np.log(np.exp(kept - kept.max()).sum())
                assert abs(a.logprobs[r, pos] - expected) <= 2 * 2e-2 * np.abs(want).max() / 0.7, (r, pos)
                checked += 1
            seq.append(token)
    assert checked >= 10


def test_decode_step_speed(cuda_backend):
    """d12, B=16, positions 480..511 (bench_rl.py's rollout): ms per decode step with the device sampler and
    replayed step graphs, against the same steps eager (their first run) and against host sampling (the
    logits copied to the host and sampled by sample_tokens, the previous rollout's way). Printed; asserted
    only that the device sampler with replays is not slower."""
    from gpt2cu.models.gpt2 import GPT, GPTConfig, init_params
    from gpt2cu.rl.rollout import BatchedDecoder, sample_tokens
    cfg = GPTConfig.from_descriptor("d12")
    backend = cuda_backend
    model = GPT(cfg, backend, 16, 512, init_params(cfg, seed=0))
    decoder = BatchedDecoder(model)
    inputs = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 512)).astype(np.int32)
    gens = [np.random.default_rng(s) for s in range(16)]
    result = {}
    # eager (first run of each position), captured (second), then replays
    for name in ("device, eager", "capture", "device, graphs", "host sampling, graphs"):
        decoder.prefill(inputs, 480)
        backend.synchronize()
        t0 = time.perf_counter()
        for _ in range(31):
            if name.startswith("host"):
                tokens, _ = sample_tokens(decoder.logits(), gens, 1.0, None)
            else:
                tokens, _ = decoder.sample(np.array([g.random() for g in gens]), 1.0, None)
            decoder.step(tokens)
        backend.synchronize()
        result[name] = (time.perf_counter() - t0) / 31 * 1e3
    print("\nd12 B=16 decode step (sampling included) at n ~500: " + ", ".join(
        f"{name} {ms:.2f} ms ({16 / ms * 1e3:,.0f} tok/s)" for name, ms in result.items()))
    assert result["device, graphs"] <= result["host sampling, graphs"]
