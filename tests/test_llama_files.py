"""The LLaMA family's files: llm.c's LLaMA model file (gpt2cu/models/llama.py; read and written through
checkpoint.py, which picks the family by magic) and llm.c's version-7 token shards (gpt2cu/data.py).

The model file is checked byte by byte against train_llama3.py's layout as this test spells it out: the
int and float header blocks, the tensor order with the MLP's up (c_fc) before its gate (c_fc2), the real
vocabulary's rows only, and q and k rows in Meta's interleaved RoPE order, which train_llama3.py gets from
transformers' rows with its `unpermute` (w.view(heads, 2, HS/2, C).transpose(1, 2)).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpt2cu import checkpoint
from gpt2cu.data import DataLoader, ShardError, load_shard_tokens, read_shard_header, write_shard
from gpt2cu.formats import HEADER_BYTES, bf16_bits_to_f32, f32_to_bf16_bits
from gpt2cu.models.llama import LlamaConfig, init_params, param_layout

CFG = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim_multiplier=1.3, multiple_of=32,
                  max_seq_len=64, vocab_size=100, padded_vocab_size=128, use_scaled_rope=True)


def params(cfg=CFG, seed=0):
    return init_params(cfg, seed) + np.float32(0.1)  # padded rows become non-zero: they must be dropped


def unpermute(w, heads):
    """train_llama3.py's unpermute: transformers' row order -> Meta's interleaved one."""
    rows, C = w.shape
    return w.reshape(heads, 2, rows // heads // 2, C).transpose(0, 2, 1, 3).reshape(rows, C)


def test_model_file_is_llmc_train_llama3_layout(tmp_path):
    path = str(tmp_path / "model.bin")
    flat = params()
    checkpoint.write_model(path, CFG, flat)
    ints = np.fromfile(path, dtype="<i4", count=256)
    floats = np.fromfile(path, dtype="<f4", count=256, offset=HEADER_BYTES)
    assert ints[:12].tolist() == [20240803, 3, 64, 100, 2, 4, 2, 32, 32, 1, 3, 1]
    assert floats[:3].tolist() == [np.float32(1.3), np.float32(1e-5), 500000.0]
    V, H, HS = CFG.vocab_size, CFG.ffn_hidden, CFG.head_size
    q, kv = CFG.n_head * HS, CFG.n_kv_head * HS
    v = param_layout(CFG).views(flat)
    c_attn = [np.concatenate([unpermute(w[:q], CFG.n_head), unpermute(w[q:q + kv], CFG.n_kv_head), w[q + kv:]])
              for w in v["qkvw"]]
    expected = [v["wte"][:V], v["ln1w"], np.stack(c_attn), v["attprojw"], v["ln2w"], v["fcw"][:, H:],
                v["fcw"][:, :H], v["fcprojw"], v["lnfw"], v["lm_head"][:V]]
    stored = np.fromfile(path, dtype="<f4", offset=2 * HEADER_BYTES)
    np.testing.assert_array_equal(stored, np.concatenate([t.reshape(-1) for t in expected]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True])
def test_model_file_round_trip(tmp_path, dtype, tied):
    cfg = LlamaConfig(**{**CFG.__dict__, "tied_embeddings": tied})
    flat = init_params(cfg, 1)  # padded rows zero, as training keeps them
    path = str(tmp_path / "model.bin")
    checkpoint.write_model(path, cfg, flat, dtype=dtype)
    assert checkpoint.read_model_header(path) == (cfg, dtype)
    back_cfg, back = checkpoint.read_model(path)
    assert back_cfg == cfg
    np.testing.assert_array_equal(back, flat if dtype == "fp32" else bf16_bits_to_f32(f32_to_bf16_bits(flat)))


def test_model_file_errors(tmp_path):
    path = str(tmp_path / "model.bin")
    checkpoint.write_model(path, CFG, params())
    raw = bytearray(open(path, "rb").read())
    # header slots: [5] n_head, [6] n_kv_head, [7] n_embd
    for patch, needle in (({6: 3}, "n_kv_head=3 does not divide n_head=4"),
                          ({5: 8, 6: 8, 7: 24}, "RoPE needs an even head dimension")):
        bad = np.frombuffer(raw, dtype="<i4").copy()
        for slot, value in patch.items():
            bad[slot] = value
        open(path, "wb").write(bad.tobytes())
        with pytest.raises(checkpoint.CheckpointError, match=f"bad model shape in header: {needle}"):
            checkpoint.read_model(path)
    open(path, "wb").write(raw[:-2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.read_model(path)
    tied = LlamaConfig(**{**CFG.__dict__, "tied_embeddings": True})
    checkpoint.write_model(path, tied, init_params(tied))
    raw = bytearray(open(path, "rb").read())
    raw[-4:] = np.float32(7.0).tobytes()  # the file's lm_head no longer equals wte
    open(path, "wb").write(raw)
    with pytest.raises(checkpoint.CheckpointError, match="lm_head differs from wte"):
        checkpoint.read_model(path)


def test_version7_shards_round_trip_and_load(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 128_256, 5000).astype(np.uint32)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240801, 7, 5000]
    assert path.stat().st_size == HEADER_BYTES + 4 * 5000
    assert read_shard_header(path) == 5000
    loaded = load_shard_tokens(path)
    assert loaded.dtype == np.uint32
    np.testing.assert_array_equal(loaded, tokens)
    loader = DataLoader(str(path), 2, 16)
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x.ravel(), tokens[:32])
    np.testing.assert_array_equal(y.ravel(), tokens[1:33])
    assert loader.max_token == 2**32 - 1
    write_shard(tmp_path / "small.bin", tokens % 65536)  # fits uint16: version 1
    assert np.fromfile(tmp_path / "small.bin", dtype="<i4", count=2).tolist() == [20240520, 1]
    assert DataLoader(str(tmp_path / "small.bin"), 2, 16).max_token == 65535
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-1])
    with pytest.raises(ShardError, match="truncated"):
        read_shard_header(path)


@pytest.mark.parametrize("hidden", [72, 40, 96])
def test_any_hf_intermediate_size_survives_the_model_file(tmp_path, hidden):
    """A Hugging Face intermediate_size becomes (ffn_dim_multiplier, multiple_of) that Meta's formula turns
    back into it, also after the multiplier's float32 trip through the file's header."""
    from gpt2cu.models.llama import ffn_shape_for
    multiplier, multiple_of = ffn_shape_for(32, hidden)
    cfg = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, ffn_dim_multiplier=multiplier,
                      multiple_of=multiple_of, max_seq_len=8)
    assert cfg.ffn_hidden == hidden
    checkpoint.write_model(str(tmp_path / "m.bin"), cfg, init_params(cfg))
    assert checkpoint.read_model_header(str(tmp_path / "m.bin"))[0] == cfg
