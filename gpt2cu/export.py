"""Hugging Face interchange: export an llm.c model file as a GPT2LMHeadModel (GPT-2 family) or
LlamaForCausalLM (LLaMA family) directory, and import such a directory (ours, or a hub download) back to our
flat params; load_weights reads either kind of model (the directory's config.json model_type picks the family).

    python -m gpt2cu.export log/model_00005000.bin out/hf    # then GPT2LMHeadModel.from_pretrained("out/hf")

The directory holds config.json and model.safetensors. The two models are the same network; only the
storage differs: HF's Conv1D keeps weights as (in, out), ours (out, in) as nn.Linear, so matmul weights
are transposed; HF's wte has the real vocabulary V rows, ours the padded Vp (the padded rows are never
selected by a token and their logits never enter the loss, so they are dropped on export and come back
as zeros); the LM head is tied to wte in both. The name table below is the only place that knows HF's
names.

LLaMA: the same tensors under LlamaForCausalLM's names, untransposed (nn.Linear), with q/k/v and gate/up
split out of our stacked qkvw and fcw; transformers' RoPE pairing is ours (rotate_half), so no rows move.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .checkpoint import read_model
from typing import Callable, NamedTuple

from .models import family_of, gpt2, llama
from .models.gpt2 import GPT2_EOT, GPTConfig, param_layout
from .extras import MissingExtra, require

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # what save_pretrained writes for sharded weights
VOCAB_ALIGN = 128  # llm.c pads the vocabulary to a multiple of 128 (50257 -> 50304)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # HF's names for the tanh GeLU our kernels compute
LN_EPS = 1e-5

# our per-layer tensor -> HF name under transformer.h.{i}., and whether it is a Conv1D weight (transposed)
PER_LAYER = (
    ("ln1w", "ln_1.weight", False), ("ln1b", "ln_1.bias", False),
    ("qkvw", "attn.c_attn.weight", True), ("qkvb", "attn.c_attn.bias", False),
    ("attprojw", "attn.c_proj.weight", True), ("attprojb", "attn.c_proj.bias", False),
    ("ln2w", "ln_2.weight", False), ("ln2b", "ln_2.bias", False),
    ("fcw", "mlp.c_fc.weight", True), ("fcb", "mlp.c_fc.bias", False),
    ("fcprojw", "mlp.c_proj.weight", True), ("fcprojb", "mlp.c_proj.bias", False),
)
# our whole-model tensor -> HF name under transformer. (wte, cut to / padded from V rows, is handled apart)
GLOBAL = (("wpe", "wpe.weight"), ("lnfw", "ln_f.weight"), ("lnfb", "ln_f.bias"))
# HF tensors that carry no parameters of ours: causal-mask buffers of old checkpoints, the tied head
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def hf_config(cfg: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS, "tie_word_embeddings": True,
        "bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT,
    }


def to_hf_tensors(cfg: GPTConfig, flat: np.ndarray) -> dict:
    """HF name -> contiguous float32 array, from our flat fp32 params."""
    views = param_layout(cfg).views(np.asarray(flat, dtype=np.float32))
    out = {f"transformer.{hf}": views[ours] for ours, hf in GLOBAL}
    out["transformer.wte.weight"] = views["wte"][:cfg.vocab_size]
    for ours, hf, conv1d in PER_LAYER:
        for i in range(cfg.n_layer):
            w = views[ours][i]
            out[f"transformer.h.{i}.{hf}"] = w.T if conv1d else w
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def _take(tensors: dict, name: str, shape, source: str) -> np.ndarray:
    """tensors.pop(name), checked to exist and to have `shape` (the one config.json implies)."""
    if name not in tensors:
        raise ValueError(f"{source}: tensor {name} is missing")
    a = tensors.pop(name)
    if a.shape != shape:
        raise ValueError(f"{source}: {name} has shape {a.shape}, config.json implies {shape}")
    return a


def from_hf_tensors(cfg: GPTConfig, tensors: dict, source: str = "") -> np.ndarray:
    """Our flat fp32 params from HF tensors (names with or without the "transformer." prefix)."""
    stripped = {name.removeprefix("transformer."): a for name, a in tensors.items()}
    flat = np.zeros(param_layout(cfg).total, dtype=np.float32)
    views = param_layout(cfg).views(flat)

    take = lambda name, shape: _take(stripped, name, shape, source)  # noqa: E731

    views["wte"][:cfg.vocab_size] = take("wte.weight", (cfg.vocab_size, cfg.n_embd))
    for ours, hf in GLOBAL:
        views[ours][...] = take(hf, views[ours].shape)
    for ours, hf, conv1d in PER_LAYER:
        for i in range(cfg.n_layer):
            shape = views[ours][i].shape
            a = take(f"h.{i}.{hf}", shape[::-1] if conv1d else shape)
            views[ours][i] = a.T if conv1d else a
    head = stripped.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, views["wte"][:cfg.vocab_size]):
        raise ValueError(f"{source}: lm_head.weight differs from wte; gpt2cu ties the LM head to wte")
    unknown = sorted(n for n in stripped if not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise ValueError(f"{source}: tensors that are not part of GPT-2: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return flat


def config_from_hf(hf: dict, source: str = "") -> GPTConfig:
    """Our GPTConfig from a GPT-2 config.json, refusing variants our model cannot compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type {hf['model_type']!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise ValueError(f"{source}: activation_function {activation!r}; gpt2cu computes the tanh GeLU "
                         f"({' / '.join(TANH_GELUS)})")
    if hf.get("layer_norm_epsilon", LN_EPS) != LN_EPS:
        raise ValueError(f"{source}: layer_norm_epsilon {hf['layer_norm_epsilon']}; gpt2cu uses {LN_EPS}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{source}: n_inner {hf['n_inner']}; gpt2cu's MLP is 4 * n_embd wide")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"{source}: tie_word_embeddings is false; gpt2cu ties the LM head to wte")
    V = hf.get("vocab_size", 50257)
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     max_seq_len=hf.get("n_positions", 1024), vocab_size=V,
                     padded_vocab_size=-(-V // VOCAB_ALIGN) * VOCAB_ALIGN)


def _weight_files(hf_dir: str) -> list:
    single = os.path.join(hf_dir, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(hf_dir, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    raise FileNotFoundError(f"{hf_dir}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}); only safetensors weights "
                            f"are read (re-save a pytorch_model.bin with save_pretrained)")


# ---- LLaMA ----------------------------------------------------------------------------------------------
LLAMA_PER_LAYER = (("ln1w", "input_layernorm.weight"), ("attprojw", "self_attn.o_proj.weight"),
                   ("ln2w", "post_attention_layernorm.weight"), ("fcprojw", "mlp.down_proj.weight"))
LLAMA31_ROPE = {"rope_type": "llama3", "factor": llama.LLAMA31_SCALING.factor,
                "low_freq_factor": llama.LLAMA31_SCALING.low_freq_factor,
                "high_freq_factor": llama.LLAMA31_SCALING.high_freq_factor,
                "original_max_position_embeddings": llama.LLAMA31_SCALING.original_max_position}


def llama_hf_config(cfg: llama.LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": LLAMA31_ROPE if cfg.use_scaled_rope else None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tied_embeddings,
        "bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT,
    }


def _qkv_split(cfg: llama.LlamaConfig) -> tuple:
    """(HF projection name, first row, end row) of each of q, k, v inside our qkvw."""
    q, kv = cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size
    return (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))


def llama_to_hf_tensors(cfg: llama.LlamaConfig, flat: np.ndarray) -> dict:
    views = llama.param_layout(cfg).views(np.asarray(flat, dtype=np.float32))
    V, H = cfg.vocab_size, cfg.ffn_hidden
    out = {"model.embed_tokens.weight": views["wte"][:V], "model.norm.weight": views["lnfw"]}
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = views["lm_head"][:V]
    for i in range(cfg.n_layer):
        prefix = f"model.layers.{i}."
        for ours, hf in LLAMA_PER_LAYER:
            out[prefix + hf] = views[ours][i]
        for hf, begin, end in _qkv_split(cfg):
            out[prefix + "self_attn." + hf + ".weight"] = views["qkvw"][i, begin:end]
        out[prefix + "mlp.gate_proj.weight"] = views["fcw"][i, :H]
        out[prefix + "mlp.up_proj.weight"] = views["fcw"][i, H:]
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def llama_from_hf_tensors(cfg: llama.LlamaConfig, tensors: dict, source: str = "") -> np.ndarray:
    remaining = dict(tensors)
    flat = np.zeros(llama.param_layout(cfg).total, dtype=np.float32)
    views = llama.param_layout(cfg).views(flat)
    V, H = cfg.vocab_size, cfg.ffn_hidden

    def take(name, target):
        target[...] = _take(remaining, name, target.shape, source)

    take("model.embed_tokens.weight", views["wte"][:V])
    take("model.norm.weight", views["lnfw"])
    if cfg.tied_embeddings:
        head = remaining.pop("lm_head.weight", None)
        if head is not None and not np.array_equal(head, views["wte"][:V]):
            raise ValueError(f"{source}: lm_head.weight differs from embed_tokens, but tie_word_embeddings is true")
    else:
        take("lm_head.weight", views["lm_head"][:V])
    for i in range(cfg.n_layer):
        prefix = f"model.layers.{i}."
        for ours, hf in LLAMA_PER_LAYER:
            take(prefix + hf, views[ours][i])
        for hf, begin, end in _qkv_split(cfg):
            take(prefix + "self_attn." + hf + ".weight", views["qkvw"][i, begin:end])
        take(prefix + "mlp.gate_proj.weight", views["fcw"][i, :H])
        take(prefix + "mlp.up_proj.weight", views["fcw"][i, H:])
    unknown = sorted(n for n in remaining if not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"{source}: tensors that are not part of LLaMA: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return flat


def llama_config_from_hf(hf: dict, source: str = "") -> llama.LlamaConfig:
    """Our LlamaConfig from a LlamaForCausalLM config.json, refusing variants our model cannot compute."""
    C, NH = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r}; gpt2cu's LLaMA MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias / mlp_bias; gpt2cu's LLaMA has no biases")
    if hf.get("head_dim") not in (None, C // NH):
        raise ValueError(f"{source}: head_dim {hf['head_dim']}; gpt2cu's LLaMA uses hidden_size / "
                         f"num_attention_heads = {C // NH}")
    # transformers 5 keeps theta and scaling together in rope_parameters, earlier versions apart
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {}),
            **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaled = rope_type == "llama3"
    if not (rope_type == "default" or scaled and all(rope.get(k) == v for k, v in LLAMA31_ROPE.items())):
        raise ValueError(f"{source}: RoPE {rope}; gpt2cu knows the default one and Llama 3.1's {LLAMA31_ROPE}")
    multiplier, multiple_of = llama.ffn_shape_for(C, hf["intermediate_size"])
    V = hf.get("vocab_size", 32000)
    return llama.LlamaConfig(
        n_layer=hf["num_hidden_layers"], n_head=NH, n_kv_head=hf.get("num_key_value_heads") or NH, n_embd=C,
        ffn_dim_multiplier=multiplier, multiple_of=multiple_of, norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope["rope_theta"]), use_scaled_rope=scaled,
        max_seq_len=hf.get("max_position_embeddings", 2048), vocab_size=V,
        padded_vocab_size=-(-V // VOCAB_ALIGN) * VOCAB_ALIGN, tied_embeddings=hf.get("tie_word_embeddings", False))


# ---- either family --------------------------------------------------------------------------------------
class HfCodec(NamedTuple):
    """One family's Hugging Face names: its config.json and its tensors, both ways."""
    config_to_hf: Callable
    tensors_to_hf: Callable
    config_from_hf: Callable
    tensors_from_hf: Callable


HF_CODECS = {gpt2: HfCodec(hf_config, to_hf_tensors, config_from_hf, from_hf_tensors),
             llama: HfCodec(llama_hf_config, llama_to_hf_tensors, llama_config_from_hf, llama_from_hf_tensors)}
MODEL_TYPES = {"gpt2": gpt2, "llama": llama}  # config.json's model_type -> family


def export_hf(out_dir: str, cfg, flat: np.ndarray) -> None:
    """Write config.json and model.safetensors for <its architecture>.from_pretrained(out_dir)."""
    save_file = require("safetensors.numpy", "Hugging Face export").save_file
    codec = HF_CODECS[family_of(cfg)]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(codec.config_to_hf(cfg), f, indent=2)
    # transformers refuses safetensors files without the "format" metadata that save_pretrained writes
    save_file(codec.tensors_to_hf(cfg, flat), os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})


def import_hf(hf_dir: str) -> tuple:
    """(config, fp32 flat params) from a Hugging Face GPT-2 or Llama directory (config.json + safetensors)."""
    load_file = require("safetensors.numpy", "reading a Hugging Face model directory").load_file
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}; not a Hugging Face model directory")
    with open(config_path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type", "gpt2")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type {model_type!r}; gpt2cu reads {', '.join(MODEL_TYPES)}")
    codec = HF_CODECS[MODEL_TYPES[model_type]]
    try:
        cfg = codec.config_from_hf(hf, config_path)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing {e}") from e
    tensors = {}
    for path in _weight_files(hf_dir):
        tensors.update(load_file(path))
    return cfg, codec.tensors_from_hf(cfg, tensors, hf_dir)


def load_weights(path: str) -> tuple:
    """(config, fp32 flat params) from an llm.c model file or a Hugging Face model directory."""
    if os.path.isdir(path):
        return import_hf(path)
    return read_model(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.export",
                                description="Export an llm.c model file as a Hugging Face GPT2LMHeadModel or "
                                            "LlamaForCausalLM directory (config.json + model.safetensors).")
    p.add_argument("checkpoint", help="llm.c model file (fp32 or bf16)")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    try:
        require("safetensors.numpy", p.prog)
    except MissingExtra as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    try:
        cfg, flat = read_model(args.checkpoint)
    except (OSError, ValueError) as e:
        p.error(str(e))
    export_hf(args.out_dir, cfg, flat)
    print(f"wrote {args.out_dir}: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} V={cfg.vocab_size} "
          f"T={cfg.max_seq_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
