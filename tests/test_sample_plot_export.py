"""gpt2cu/sample.py (sampling rules, generation with the fixed-(B, T) model against a one-sequence
reference, KV-cache decoding (gpt2cu/kv_cache.py) against the full recompute, the CLI), gpt2cu/plot.py (log parsing, resumed logs, errors, the PNG) and gpt2cu/export.py
(Hugging Face round trip, hub-style names, refusals, and logits equal to transformers' GPT2LMHeadModel
when transformers is installed)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.models.gpt2 import GPTConfig, GPT, init_params

# GPT-2's vocabulary (EOT pads the sampler's rows; HF needs the real V), everything else tiny
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=8, max_seq_len=16)


def random_params(seed=0):
    """init_params plus noise, so every tensor (biases, layernorms) is distinct and the model has
    preferences; the padded vocabulary rows stay zero as in training."""
    params = init_params(CFG, seed=seed)
    params += np.random.default_rng(seed).normal(0, 0.3, params.shape).astype(np.float32)
    from gpt2cu.models.gpt2 import param_layout
    param_layout(CFG).views(params)["wte"][CFG.vocab_size:] = 0
    return params


# ---- sample.py ----------------------------------------------------------------------------------------
def test_sample_token_rules():
    from gpt2cu.sample import sample_token
    logits = np.array([0.0, 3.0, 1.0, 2.9, -5.0])
    rng = np.random.default_rng(0)
    assert sample_token(logits, rng, temperature=0) == 1
    assert sample_token(logits, rng, top_k=1) == 1
    draws = {sample_token(logits, rng, top_k=2) for _ in range(200)}
    assert draws == {1, 3}
    hot = [sample_token(logits, np.random.default_rng(s), temperature=100.0) for s in range(300)]
    assert set(hot) == set(range(5))  # a high temperature flattens the distribution
    with pytest.raises(ValueError, match="temperature"):
        sample_token(logits, rng, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_token(logits, rng, top_k=0)


def test_generate_matches_one_sequence_reference_and_slides_past_T():
    from gpt2cu.sample import generate
    backend, params = NumpyBackend(), random_params()
    B, T = 2, 6
    model = GPT(CFG, backend, B, T, params)
    prompt = [50256, 464, 3290]
    got = generate(model, backend, prompt, 8, temperature=0)  # 11 tokens in all: slides past T = 6
    seq = list(prompt)
    for _ in range(8):  # greedy reference: a model exactly as long as the window, one row
        window = seq[-T:]
        ref = GPT(CFG, backend, 1, len(window), params)
        ref.forward(ref.ops.set_batch(np.array([window], np.int32)))
        seq.append(int(np.argmax(ref.logits()[0, -1, :CFG.vocab_size])))
    assert got == seq[len(prompt):]
    a = generate(model, backend, prompt, 5, seed=1)
    assert a == generate(model, backend, prompt, 5, seed=1)
    assert all(0 <= t < CFG.vocab_size for t in a)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, backend, [], 3)


@pytest.mark.parametrize("recompute", [0, 3])
@pytest.mark.parametrize("attention", ["query", "kernel"])
def test_kv_cache_logits_match_full_forward_every_step(attention, recompute):
    """Prefill + one cached step per token against a full forward over the whole prefix (B=1, T=its
    length), at every step: float32 logits within 1e-4 relative. The decoder's model has B=2 and a T
    longer than the sequence, as generate's (the prefill leaves the other row and positions unseen).
    Both attention forms: the one query in array math, and the backend's attention op over the cache.
    -r 3 (train.py's -s samples from the training model): one block's buffers, so the prefill caches each
    layer's rows as the forward goes."""
    from gpt2cu.kv_cache import KVCacheDecoder
    backend, params = NumpyBackend(), random_params(seed=3)
    seq = [50256, 464, 3290, 318]
    dec = KVCacheDecoder(GPT(CFG, backend, 2, CFG.max_seq_len, params, recompute=recompute), capacity=12,
                         attention=attention)
    assert dec.attention == attention
    logits = dec.prefill(seq)
    tokens = list(np.random.default_rng(1).integers(0, CFG.vocab_size, 12 - len(seq)))
    for step, tok in enumerate([None] + tokens):
        if tok is not None:
            seq.append(int(tok))
            logits = dec.step(int(tok))
        ref = GPT(CFG, backend, 1, len(seq), params)
        ref.forward(ref.ops.set_batch(np.array([seq], np.int32)))
        want = ref.logits()[0, -1, :CFG.vocab_size]
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=f"step {step}")
    assert dec.pos == 12
    with pytest.raises(ValueError, match="full"):
        dec.step(0)
    with pytest.raises(ValueError, match="prompt"):
        dec.prefill(list(range(13)))
    with pytest.raises(ValueError, match="attention"):
        KVCacheDecoder(dec.model, attention="paged")
    with pytest.raises(ValueError, match="capacity"):
        KVCacheDecoder(dec.model, capacity=CFG.max_seq_len + 1)


@pytest.mark.parametrize("T, n", [(16, 12), (6, 8), (2, 5)])  # cache only; cache then slide; prompt > T
def test_generate_with_kv_cache_equals_recompute(T, n):
    from gpt2cu.sample import generate
    backend, params = NumpyBackend(), random_params(seed=1)
    model = GPT(CFG, backend, 1, T, params)
    prompt = [50256, 464, 3290]
    cached = generate(model, backend, prompt, n, temperature=0)
    assert cached == generate(model, backend, prompt, n, temperature=0, kv_cache=False)
    assert len(set(cached)) > 1  # the model has preferences that change with the context
    sampled = generate(model, backend, prompt, n, temperature=0.8, top_k=50, seed=7)
    assert sampled == generate(model, backend, prompt, n, temperature=0.8, top_k=50, seed=7, kv_cache=False)


def test_sample_cli(tmp_path, capsys):
    from gpt2cu.checkpoint import write_model
    from gpt2cu.sample import main
    path = str(tmp_path / "model.bin")
    write_model(path, CFG, random_params())
    assert main([path, "--prompt", "Hello", "-n", "4", "--backend", "numpy", "--top-k", "5"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert main([path, "-n", "3", "--backend", "numpy", "--temperature", "0"]) == 0
    cached = capsys.readouterr().out
    assert main([path, "-n", "3", "--backend", "numpy", "--temperature", "0", "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert main([path, "--prompt", "Hello", "-n", "20", "--backend", "numpy", "--temperature", "0"]) == 0
    long = capsys.readouterr().out  # 21+ tokens > max_seq_len 16: the cache, then the sliding window
    assert main([path, "--prompt", "Hello", "-n", "20", "--backend", "numpy", "--temperature", "0",
                 "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == long
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.bin"), "--backend", "numpy"])
    assert "missing.bin" in capsys.readouterr().err


# ---- plot.py ------------------------------------------------------------------------------------------
def write_log(d, lines):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "main.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_read_log_keys_unknown_fields_and_resume(tmp_path):
    from gpt2cu.plot import read_log
    d = str(tmp_path / "run")
    write_log(d, ["s:0 tel:10.9", "s:1 trl:10.5 lr:0.0006 norm:1.2", "s:2 trl:9.0", "s:3 trl:8.0",
                  "", "s:2 tel:9.5 eval:0.25",
                  "s:2 trl:8.9",  # resumed from step 1's checkpoint: step 2 again, step 3 abandoned
                  "s:3 trl:8.1"])
    log = read_log(os.path.join(d, "main.log"))
    assert log["trl"] == [(1, 10.5), (2, 8.9), (3, 8.1)]
    assert log["tel"] == [(0, 10.9), (2, 9.5)]
    assert log["eval"] == [(2, 0.25)]


@pytest.mark.parametrize("line", ["s:1 trl:abc", "hello", "trl:1.0", "s:x trl:1"])
def test_read_log_errors_name_file_and_line(tmp_path, line):
    from gpt2cu.plot import LogError, read_log
    d = str(tmp_path / "run")
    write_log(d, ["s:1 trl:2.0", line])
    with pytest.raises(LogError, match=r"main\.log:2"):
        read_log(os.path.join(d, "main.log"))


def test_plot_cli_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gpt2cu.plot import main
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_log(a, ["s:0 tel:11.0", "s:1 trl:10.0", "s:2 trl:9.0", "s:2 tel:9.2", "s:2 eval:0.26"])
    write_log(b, ["s:1 trl:10.2", "s:2 trl:9.5"])
    out = str(tmp_path / "curves.png")
    assert main([a, b, "-o", out, "--ref-val-loss", "3.28", "--ref-hellaswag", "29.4",
                 "--tokens-per-step", "524288"]) == 0
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main([b, "-o", out]) == 0  # no HellaSwag anywhere: the loss panel alone
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), "-o", out])
    assert "nowhere" in capsys.readouterr().err


# ---- export.py ----------------------------------------------------------------------------------------
def test_export_import_round_trip(tmp_path):
    from gpt2cu.export import import_hf, export_hf
    params = random_params()
    export_hf(str(tmp_path), CFG, params)
    config = json.load(open(tmp_path / "config.json"))
    assert config["vocab_size"] == 50257 and config["activation_function"] == "gelu_new"
    cfg, back = import_hf(str(tmp_path))
    assert cfg == CFG
    np.testing.assert_array_equal(back, params)


def test_import_accepts_hub_names_and_refuses_other_models(tmp_path):
    from safetensors.numpy import load_file, save_file
    from gpt2cu.export import export_hf, import_hf
    params = random_params()
    export_hf(str(tmp_path), CFG, params)
    weights = str(tmp_path / "model.safetensors")
    tensors = load_file(weights)
    # the hub's gpt2 files: no "transformer." prefix, causal-mask buffers, an explicit tied head
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    hub["h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
    hub["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(hub, weights, metadata={"format": "pt"})
    np.testing.assert_array_equal(import_hf(str(tmp_path))[1], params)

    save_file({**hub, "lm_head.weight": hub["wte.weight"] + 1}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head"):
        import_hf(str(tmp_path))
    del hub["h.1.mlp.c_fc.bias"]
    save_file(hub, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias is missing"):
        import_hf(str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, "activation_function": "relu"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="relu"):
        import_hf(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(str(tmp_path))


def test_export_cli(tmp_path):
    from gpt2cu.checkpoint import write_model
    from gpt2cu.export import import_hf, main
    params = random_params()
    write_model(str(tmp_path / "model.bin"), CFG, params)
    assert main([str(tmp_path / "model.bin"), str(tmp_path / "hf")]) == 0
    np.testing.assert_array_equal(import_hf(str(tmp_path / "hf"))[1], params)


def test_transformers_gives_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install "
                                                              "transformers to check the export against it)")
    import torch
    from gpt2cu.export import export_hf
    params = random_params()
    export_hf(str(tmp_path), CFG, params)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    model = GPT(CFG, NumpyBackend(), 2, 12, params)
    model.forward(model.ops.set_batch(tokens))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert theirs.shape == (2, 12, CFG.vocab_size)
    np.testing.assert_allclose(model.logits()[..., :CFG.vocab_size], theirs, atol=2e-5, rtol=1e-4)
