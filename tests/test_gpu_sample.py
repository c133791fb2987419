"""KV-cache decoding (gpt2cu/kv_cache.py) on the CUDA backend: per-step logits against the full bf16
forward, generate() with and without the cache, the `python -m gpt2cu.sample` CLI, and the throughput of
cached against recomputed sampling (printed; run with -s). Skipped without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt2cu
from gpt2cu.models.gpt2 import GPT, GPTConfig, init_params

pytestmark = pytest.mark.gpu
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=64)
# logits of the cached step against the full forward's, both bf16: |diff| <= REL * max|logits|
REL = 2e-2


def tiny_params(seed=0):
    """init_params plus noise (padded vocabulary rows stay zero): distinct biases and layernorms, and
    logits spread enough (std ~1) that the greedy choice is mostly well separated."""
    from gpt2cu.models.gpt2 import param_layout
    params = init_params(TINY, seed=seed)
    params += np.random.default_rng(seed).normal(0, 0.08, params.shape).astype(np.float32)
    param_layout(TINY).views(params)["wte"][TINY.vocab_size:] = 0
    return params


def top2_gap(logits):
    s = np.partition(logits, -2)[-2:]
    return float(s[1] - s[0])


@pytest.mark.parametrize("attention", ["kernel", "query"])
def test_cached_logits_match_full_forward_every_step(cuda_backend, attention):
    """Greedy decoding over the cache up to max_seq_len; at every step the cached logits are within bf16
    tolerance of the full forward's last-position logits (a B=1, T=64 model over the same prefix), and the
    chosen token is the full forward's argmax wherever the top-2 gap exceeds the observed difference.
    Both also stay close to the float32 numpy forward. Both attention forms: the flash kernel over the
    cached rows (the default on CUDA) and the one query in float32 CuPy."""
    from gpt2cu.backends.numpy_ops import NumpyBackend
    from gpt2cu.formats import bf16_bits_to_f32, f32_to_bf16_bits
    from gpt2cu.kv_cache import KVCacheDecoder
    from gpt2cu.sample import recompute_logits
    backend, params = cuda_backend, tiny_params()
    T = TINY.max_seq_len
    dec = KVCacheDecoder(GPT(TINY, backend, 1, T, params), attention=attention)
    full = GPT(TINY, backend, 1, T, params)
    host = NumpyBackend()
    oracle = GPT(TINY, host, 1, T, bf16_bits_to_f32(f32_to_bf16_bits(params)))  # the same bf16 weights
    seq = [50256, 15496, 11, 616]
    logits = dec.prefill(seq)
    worst, worst_oracle, ties = 0.0, 0.0, 0
    while True:
        want = recompute_logits(full, backend, seq)
        scale = float(np.abs(want).max())
        err = float(np.abs(logits - want).max())
        worst = max(worst, err / scale)
        assert err <= REL * scale, f"position {len(seq) - 1}: max |cached - full| = {err:.4g}, max |full| = {scale:.4g}"
        ref = recompute_logits(oracle, host, seq)
        err_oracle = float(np.abs(logits - ref).max())
        worst_oracle = max(worst_oracle, err_oracle / scale)
        assert err_oracle <= 2 * REL * scale, f"position {len(seq) - 1}: cached vs fp32 {err_oracle:.4g}"
        token = int(np.argmax(logits))
        if top2_gap(want) > 2 * err:
            assert token == int(np.argmax(want)), f"position {len(seq) - 1}"
        else:
            ties += 1
        seq.append(token)
        if len(seq) > T:
            break
        logits = dec.step(token)
    assert dec.pos == T
    print(f"\n[{attention}] cached vs full bf16 forward: max rel diff {worst:.3g}; vs fp32 numpy {worst_oracle:.3g}; "
          f"{ties} near-ties of {T - 3} steps")


def test_generate_cached_equals_recompute(cuda_backend):
    """generate() with the cache against kv_cache=False (greedy): the same tokens, except where the two
    bf16 computations may disagree (a near-tie of the top-2 logits), after which the sequences diverge;
    also past T (the cache, then the sliding window) and with sampling."""
    from gpt2cu.sample import generate, recompute_logits
    backend, params = cuda_backend, tiny_params(seed=1)
    for T, n in ((32, 28), (16, 24)):
        model = GPT(TINY, backend, 1, T, params)
        prompt = [50256, 464, 3290, 318]
        cached = generate(model, backend, prompt, n, temperature=0)
        again = generate(model, backend, prompt, n, temperature=0, kv_cache=False)
        assert len(cached) == n and all(0 <= t < TINY.vocab_size for t in cached)
        diff = next((i for i, (a, b) in enumerate(zip(cached, again)) if a != b), None)
        if diff is not None:
            logits = recompute_logits(model, backend, prompt + cached[:diff])
            assert top2_gap(logits) < REL * np.abs(logits).max(), f"T={T}: tokens differ at {diff} without a near-tie"
        sampled = generate(model, backend, prompt, n, temperature=1.0, top_k=40, seed=5)
        assert sampled == generate(model, backend, prompt, n, temperature=1.0, top_k=40, seed=5)


def test_sample_cli_cuda(tmp_path):
    from gpt2cu.checkpoint import write_model
    cfg = GPTConfig.from_descriptor("d2")
    path = str(tmp_path / "d2.bin")
    write_model(path, cfg, init_params(cfg, seed=0))
    # the subprocess imports gpt2cu from where this process did (the source tree for an editable install; a
    # --target or site-packages install otherwise, whose compiled extension the source tree lacks)
    here = os.path.dirname(os.path.dirname(os.path.abspath(gpt2cu.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    for extra in ([], ["--no-kv-cache"]):
        r = subprocess.run([sys.executable, "-m", "gpt2cu.sample", path, "--prompt", "Hello", "-n", "16",
                            "--backend", "cuda", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n"), r.stdout


def greedy_cached(model, prompt, n, attention):
    from gpt2cu.kv_cache import KVCacheDecoder
    dec = KVCacheDecoder(model, len(prompt) + n - 1, attention=attention)
    logits, out = dec.prefill(prompt), []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = dec.step(out[-1])
    return out


def test_throughput_cached_vs_recompute(cuda_backend):
    """tokens/s of greedy sampling on d12 (random init), B=1, as the CLI builds the model (T = prompt + n):
    the KV cache with either attention form against the full recompute per token. Printed; asserted only
    that the default cache beats the recompute at T=1024."""
    from gpt2cu.sample import generate
    backend = cuda_backend
    cfg = GPTConfig.from_descriptor("d12")
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    runs = {"cache (kernel attention)": lambda m, p, n: greedy_cached(m, p, n, "kernel"),
            "cache (query attention)": lambda m, p, n: greedy_cached(m, p, n, "query"),
            "recompute": lambda m, p, n: generate(m, backend, p, n, temperature=0, kv_cache=False)}
    lines = []
    for P, n in ((16, 112), (896, 128)):
        model = GPT(cfg, backend, 1, P + n, params)
        prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, P)]
        rates = {}
        for name, fn in runs.items():
            fn(model, prompt, 4)  # warm-up: cuBLASLt plans, CuPy kernels
            backend.synchronize()
            t0 = time.perf_counter()
            fn(model, prompt, n)
            backend.synchronize()
            rates[name] = n / (time.perf_counter() - t0)
        lines.append(f"d12 prompt {P} + {n} new (T={P + n}): " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates.items()))
        if P + n == 1024:
            assert rates["cache (kernel attention)"] > rates["recompute"]
    print("\n" + "\n".join(lines) + f"\n({backend.device_name()}; prefill included)")
