"""Text generation: train.py's periodic samples and `python -m gpt2cu.sample CHECKPOINT`.

    python -m gpt2cu.sample log/model_00005000.bin --prompt "The meaning of life is" -n 64 --top-k 40

Generation reuses the training model as it is, with its fixed (B, T) buffers. By default (kv_cache=True,
on the numpy and CUDA backends) the prompt is one forward of that model (row 0; the other rows hold EOT
and are ignored) and each new token is then one incremental step over a KV cache (gpt2cu/kv_cache.py):
the same ops on a single row, with attention over the cached keys and values. Positions
are absolute, so the cache covers the first T positions only: once the running sequence outgrows T
(the CLI builds T = min(max_seq_len, prompt + n)), or if the prompt alone is longer than T, generation
falls back to the full recompute -- one forward over the last T tokens per new token, the window
sliding -- which is also what kv_cache=False does throughout. Both give the same tokens up to
floating-point reduction order (exactly the same greedy tokens on numpy in the tests; bf16 rounding on
CUDA).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .export import load_weights
from .kv_cache import KVCacheDecoder, padding_token
from .models.gpt2 import GPT2_EOT


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_k: int | None = None) -> int:
    """One token id from the logits of one position (over the real vocabulary only).
    temperature 0 is greedy; top_k keeps the k most likely tokens."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def recompute_logits(model, backend, seq) -> np.ndarray:
    """float32 host logits (first vocab_size columns) after the last token of seq: one full forward of
    model over seq's last T tokens in row 0 (the window slides once seq outgrows T)."""
    B, T = model.B, model.T
    window = seq[-T:]
    inputs = np.full((B, T), padding_token(model.cfg), dtype=np.int32)
    inputs[0, :len(window)] = window  # positions past the window are never seen (causal attention)
    model.forward(backend.set_batch(inputs))
    return model.logits(0, len(window) - 1)[:model.cfg.vocab_size]


def generate(model, backend, prompt_tokens, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 1337, kv_cache: bool = True) -> list:
    """The max_new_tokens tokens sampled after prompt_tokens (the prompt is not repeated). Deterministic
    for a given seed, model and backend. kv_cache: decode incrementally while the sequence fits in
    model.T, then recompute; False: recompute every token."""
    if len(prompt_tokens) == 0:
        raise ValueError("generate needs at least one prompt token (e.g. EOT to start a document)")
    rng = np.random.default_rng(seed)
    seq, new = list(prompt_tokens), []
    decoder, logits = None, None
    # the cache holds the positions whose logits are needed: the prompt's and all but the last new token's
    capacity = min(model.T, len(seq) + max_new_tokens - 1)
    if kv_cache and max_new_tokens > 0 and len(seq) <= capacity:
        decoder = KVCacheDecoder(model, capacity)
        logits = decoder.prefill(seq)
    for i in range(max_new_tokens):
        if logits is None:
            logits = recompute_logits(model, backend, seq)
        token = sample_token(logits, rng, temperature, top_k)
        seq.append(token)
        new.append(token)
        logits = None
        if i + 1 < max_new_tokens and decoder is not None and decoder.pos < decoder.capacity:
            logits = decoder.step(token)
    return new


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.sample",
                                description="Sample text from an llm.c model file (or a Hugging Face GPT-2 "
                                            "directory, as gpt2cu.export writes). The prompt is one forward "
                                            "pass; each new token is then one step over a KV cache (numpy "
                                            "and CUDA backends). Past the model's max_seq_len positions the "
                                            "cache cannot grow: generation goes on with the windowed "
                                            "recompute (one forward over the last max_seq_len tokens per "
                                            "new token), as it does from the start for a prompt that long.")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default=None, help="start text (default: <|endoftext|>, a new document)")
    p.add_argument("-n", dest="max_new_tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--backend", default="auto", choices=("auto", "numpy", "cuda"))
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                   help="recompute the full forward for every new token (slower; for comparison)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"-n must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")

    from .backends import get_backend
    from .models import family_of
    from .tokenizer import decode, encode

    try:
        cfg, params = load_weights(args.checkpoint)
        backend = get_backend(args.backend)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        p.error(str(e))
    prompt = [GPT2_EOT] if args.prompt is None else encode(args.prompt)
    if not prompt:
        p.error("--prompt encodes to no tokens; leave it out to start from <|endoftext|>")
    T = min(cfg.max_seq_len, len(prompt) + args.max_new_tokens)
    model = family_of(cfg).Model(cfg, backend, B=1, T=T, params=params)
    new = generate(model, backend, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   kv_cache=args.kv_cache)
    print(decode(new if args.prompt is None else prompt + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
