"""Model families. A family is one module that owns a model's whole definition:

    Config                          its shape (a frozen dataclass), with from_descriptor(desc)
    param_layout(cfg)               the parameter table (layout.Layout): order, decay, per_layer
    activation_layout(cfg, B, T, recompute)
    init_params(cfg, seed)          fresh fp32 flat parameters
    Model(cfg, backend, B, T, params, recompute=, storage=)   a base.FlatModel (storage: zero.make_storage)
        forward(batch, dloss), backward(batch, layer_done=None), logits(row, position) and lm_head(out,
        hidden) (inference), zero_grad(), load_params(host),
        host_params(), forward_schedule(acts, attend, tokens, position_rows) (the KV-cache decoder
        runs it), position_rows(start, stop) (what the schedule needs of those positions), attend(l, block)
        (fills block["atty"], block["att_lse"] from block["qkv"]), decode_buffers(rows) (buffers for
        the decoder), params / grads / acts / layout / cfg / B / T
    MODEL_FILE, write_model_file(path, cfg, params, dtype), read_model_file_header(path, error),
        read_model_file(path, error)   llm.c's model file of the family (checkpoint.py picks it by magic)

A Config also has head_size, n_kv_head, qkv_width (the decoder's cache row), num_parameters() and
flops_per_token(T).

The trainer, the optimizer, checkpoints and the decoder see a family only through that interface, so a
new architecture is a new module here plus a descriptor prefix in DESCRIPTORS.
"""
from __future__ import annotations

from . import gpt2, llama

# descriptor prefix -> family module ("d12" has no prefix: GPT-2, as llm.c names it)
DESCRIPTORS = {"": gpt2, "llama": llama}
# prefixes that name shapes of an existing family: "gpt3:175B" is a GPT-2-family config (gpt2.GPT3_SIZES)
SHAPE_PREFIXES = {"gpt3": gpt2.GPTConfig.from_gpt3}


def family_of(cfg):
    """The family module whose Config `cfg` is."""
    for family in DESCRIPTORS.values():
        if isinstance(cfg, family.Config):
            return family
    raise TypeError(f"{type(cfg).__name__} is the config of no known model family")


def config_from_descriptor(desc: str):
    """'d12' -> GPT-2 124M's config; 'gpt3:175B' -> a GPT-3 shape; 'family:spec' -> that family's reading of spec."""
    prefix, _, spec = desc.rpartition(":")
    if prefix in SHAPE_PREFIXES:
        return SHAPE_PREFIXES[prefix](spec)
    if prefix not in DESCRIPTORS:
        known = ", ".join(p + ":" for p in [*DESCRIPTORS, *SHAPE_PREFIXES] if p)
        raise ValueError(f"unknown model family {prefix!r} in {desc!r}" + (f" (known: {known})" if known else ""))
    return DESCRIPTORS[prefix].Config.from_descriptor(spec)
