"""The LLaMA family (gpt2cu/models/llama.py) on the numpy backend against transformers' LlamaForCausalLM:
a random-init model saved with save_pretrained and read through our Hugging Face import gives the same
logits, loss and gradient of every parameter at fp32 tolerance; the export goes back unchanged; recompute
settings change nothing; the KV-cache decoder equals the full forward; descriptors and bad shapes.

Tolerance: REL 1e-4 on ||ours - theirs|| / ||theirs||. Both sides compute in float32 with different
reduction orders (numpy's pairwise sums and BLAS vs torch's kernels): ~1e-6 per op, a few hundred ops deep;
a wrong pairing, group or transpose is O(1) off.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.models import config_from_descriptor
from gpt2cu.models.llama import Llama, LlamaConfig, ffn_hidden_size, init_params, param_layout

REL = 1e-4
B, T = 2, 12


def assert_close(actual, expected, what, rel=REL):
    err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
    assert err < rel, f"{what}: relative error {err:.2e} >= {rel:.0e}"


def save_hf_model(torch, transformers, directory, tied=False, scaled=False, n_kv_head=2, seed=0):
    """A random-init LlamaForCausalLM (biased norm gains, so RMSNorm weights matter) saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192} if scaled else None,
        tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.mul_(10)  # init std 0.02 -> 0.2: attention patterns and gates far from uniform
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("tied, scaled, n_kv_head", [(False, False, 2), (True, True, 1), (False, True, 4)],
                         ids=["gqa", "tied-mqa-scaled-rope", "mha-scaled-rope"])
def test_logits_loss_and_gradients_equal_transformers(tmp_path, torch, transformers, tied, scaled, n_kv_head):
    from gpt2cu.export import import_hf, llama_from_hf_tensors
    hf = save_hf_model(torch, transformers, tmp_path, tied, scaled, n_kv_head)
    cfg, params = import_hf(str(tmp_path))
    assert (cfg.n_kv_head, cfg.tied_embeddings, cfg.use_scaled_rope, cfg.ffn_hidden) == (n_kv_head, tied, scaled, 72)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)

    backend = NumpyBackend()
    model = Llama(cfg, backend, B, T, params)
    model.forward(backend.set_batch(tokens))
    logits = model.logits()[..., :cfg.vocab_size]
    batch = backend.set_batch(tokens, targets)
    model.forward(batch, dloss=1.0 / (B * T))
    loss = float(model.acts["losses"].mean())
    model.backward(batch)

    out = hf(torch.from_numpy(tokens.astype(np.int64)), labels=None)
    theirs_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size),
                                                    torch.from_numpy(targets.astype(np.int64)).reshape(-1))
    theirs_loss.backward()
    assert_close(logits, out.logits.detach().numpy(), "logits")
    assert abs(loss - theirs_loss.item()) < 1e-5 * abs(theirs_loss.item())
    theirs_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    if tied:  # transformers names the shared tensor once
        theirs_grads.pop("lm_head.weight", None)
    theirs = param_layout(cfg).views(llama_from_hf_tensors(cfg, theirs_grads, "grads"))
    ours = param_layout(cfg).views(model.grads)
    for name in param_layout(cfg).names:
        assert_close(ours[name], theirs[name], f"gradient of {name}")


def test_hf_export_round_trip_and_transformers_reads_it(tmp_path, torch, transformers):
    from gpt2cu.export import export_hf, import_hf
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16, use_scaled_rope=True)
    params = init_params(cfg, seed=3)
    export_hf(str(tmp_path), cfg, params)
    assert json.load(open(tmp_path / "config.json"))["num_key_value_heads"] == 2
    back_cfg, back = import_hf(str(tmp_path))
    assert back_cfg == cfg
    np.testing.assert_array_equal(back, params)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    model = Llama(cfg, NumpyBackend(), B, T, params)
    model.forward(model.ops.set_batch(tokens))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert_close(model.logits()[..., :cfg.vocab_size], theirs, "logits")


def test_hf_import_refuses_what_it_cannot_compute(tmp_path):
    from gpt2cu.export import export_hf, import_hf
    cfg = LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=8)
    export_hf(str(tmp_path), cfg, init_params(cfg))
    config = json.load(open(tmp_path / "config.json"))
    for change, needle in (({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "bias"),
                           ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE"),
                           ({"num_key_value_heads": 3}, "does not divide"), ({"model_type": "mistral"}, "mistral")):
        json.dump({**config, **change}, open(tmp_path / "config.json", "w"))
        with pytest.raises(ValueError, match=needle):
            import_hf(str(tmp_path))


@pytest.mark.parametrize("recompute", [1, 2, 3])
def test_recompute_settings_give_identical_gradients(recompute):
    """Recomputing the SwiGLU output (1), also the RMSNorm outputs (2), or the whole block from its input (3)
    runs the forward's very ops again: the gradients equal -r 0's bit for bit."""
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128,
                      max_seq_len=16)
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens, targets = (rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32) for _ in range(2))
    grads = {}
    for r in (0, recompute):
        backend = NumpyBackend()
        model = Llama(cfg, backend, B, T, params, recompute=r)
        batch = backend.set_batch(tokens, targets)
        model.forward(batch, dloss=1.0 / (B * T))
        model.backward(batch)
        grads[r] = model.grads.copy()
    np.testing.assert_array_equal(grads[recompute], grads[0])


@pytest.mark.parametrize("attention", ["query", "kernel"])
def test_kv_cache_logits_equal_the_full_forward(attention):
    from gpt2cu.kv_cache import KVCacheDecoder
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16)
    params = init_params(cfg, seed=1) * 5  # far from uniform attention
    backend = NumpyBackend()
    model, reference = Llama(cfg, backend, 2, 16, params), Llama(cfg, backend, 1, 16, params)
    seq = list(np.random.default_rng(2).integers(0, cfg.vocab_size, 12))
    decoder = KVCacheDecoder(model, 12, attention=attention)
    logits = [decoder.prefill(seq[:4])] + [decoder.step(token) for token in seq[4:11]]
    inputs = np.zeros((1, 16), np.int32)
    inputs[0, :12] = seq
    reference.forward(backend.set_batch(inputs))
    for i, got in enumerate(logits):
        assert_close(got, reference.logits(0, 3 + i)[:cfg.vocab_size], f"position {3 + i}", rel=1e-5)


def test_descriptors_scale_like_gpt2():
    d12 = config_from_descriptor("llama:d12")
    assert (d12.n_layer, d12.n_embd, d12.n_head, d12.n_kv_head, d12.ffn_hidden) == (12, 768, 12, 4, 2048)
    assert d12.head_size == 64 and not d12.tied_embeddings and d12.rope_theta == 500000.0
    assert config_from_descriptor("llama:d2").n_kv_head == 1
    assert config_from_descriptor("llama:d24").n_kv_head == 4  # 16 heads: the largest divisor <= 5
    with pytest.raises(ValueError, match="llama:d12"):
        config_from_descriptor("llama:x12")


def test_meta_ffn_width_and_bad_shapes():
    assert ffn_hidden_size(4096, 1.3, 1024) == 14336  # Llama 3 8B
    assert ffn_hidden_size(2048, 1.5, 256) == 8192    # Llama 3.2 1B
    with pytest.raises(ValueError, match="does not divide"):
        LlamaConfig(n_layer=1, n_head=6, n_kv_head=4, n_embd=48)
    with pytest.raises(ValueError, match="even head dimension"):
        LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=36)


@pytest.mark.parametrize("tied", [False, True])
def test_torch_reference_equals_the_numpy_model(torch, tied):
    """gpt2cu.reference.torch_llama (the GPU tests' and benchmark's baseline) computes this family's network:
    loss and every gradient equal the numpy model's on the same flat parameters, in fp32."""
    from gpt2cu.reference.torch_llama import TorchLlama
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, padded_vocab_size=128,
                      max_seq_len=16, use_scaled_rope=True, tied_embeddings=tied)
    params = init_params(cfg, seed=4) * 3
    rng = np.random.default_rng(5)
    tokens, targets = (rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32) for _ in range(2))
    backend = NumpyBackend()
    model = Llama(cfg, backend, B, T, params)
    batch = backend.set_batch(tokens, targets)
    model.forward(batch, dloss=1.0 / (B * T))
    model.backward(batch)
    ref = TorchLlama.from_flat(cfg, params)
    _, loss = ref(torch.from_numpy(tokens).long(), torch.from_numpy(targets).long())
    loss.backward()
    assert abs(float(model.acts["losses"].mean()) - loss.item()) < 1e-5 * loss.item()
    layout = param_layout(cfg)
    theirs = layout.views(ref.grads_to_flat())
    for name, ours in layout.views(model.grads).items():
        assert_close(ours, theirs[name], f"gradient of {name}")
