"""Memory per rank, by group, computed from the same tables the trainer allocates from: the storage's
buffer sizes (zero.buffer_elements), the family's activation table, and the CUDA kernels' scratch sizes
mirrored here. The trainer prints this table at start-up; `python -m gpt2cu.plan` prints it without a GPU.

Groups: parameters (what the rank keeps: all of them, or its ZeRO-3 shard), gradients (all, or the
ZeRO-2/3 shard), optimizer state (fp32 m and v of the rank's shard, plus fp32 master weights when the
parameters are bf16), activations (the family's activation table), communication buffers (ZeRO-2/3: the
gradient buffers the backward reduce-scatters from; ZeRO-3 also the gathered parameters) and workspace
(CUDA: the kernels' scratch, cuBLASLt's workspace, the batch buffers, the fp32 temporaries of ZeRO-2/3's
gradient accumulation). Not counted: the CUDA context and NCCL's own buffers (about 0.5-1 GiB per GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import family_of
from .models.gpt2 import LM_HEAD_CHUNK_ROWS
from .zero import buffer_elements, zero_units

GROUPS = ("parameters", "gradients", "optimizer state", "activations", "communication buffers", "workspace")

# kernels/matmul.cu: kWorkspaceBytes, one cuBLASLt workspace per stream that runs matmuls (the compute stream)
CUBLASLT_WORKSPACE_BYTES = 32 << 20


# ---- the CUDA launchers' scratch sizes (kernels/*.cu, *_scratch_floats), mirrored -----------------------
def layernorm_backward_scratch_floats(N: int, C: int) -> int:
    return -(-N // 64) * 3 * C  # norm_backward.cuh: a partial row each of dweight, dbias, dinp_sum per 64 rows


def bias_backward_scratch_floats(N: int, OC: int) -> int:
    return -(-N // 256) * OC  # bias.cu: BIAS_ROWS = 256 rows per partial row


def matmul_backward_scratch_floats(N: int, C: int, OC: int, dbias: bool, dgelu: bool,
                                   dgelu_dbias: bool = False) -> int:
    """matmul.cu: dbias's partial sums, or with the DGELU epilogue the weight (OC, C) transposed in bf16 (Hopper's
    kernel reads it K-major), then with dgelu_dbias dinp's column sums per 128-row tile (gemm_sm90.h's
    gemm_sm90_row_tiles; off Hopper bias_backward's partials of dinp): the largest, used one after the other
    (asked for on every GPU)."""
    dgelu = dgelu or dgelu_dbias
    return max(bias_backward_scratch_floats(N, OC) if dbias else 0,
               -(-C * OC // 2) + (-(-N // 128) * C if dgelu_dbias else 0) if dgelu else 0,
               bias_backward_scratch_floats(N, C) if dgelu_dbias else 0)


def attention_backward_scratch_floats(B: int, T: int, n_head: int, head_size: int) -> int:
    """attention.cu: D = rowsum(dO * O), one float per (b, h, t) (not when the caller gives D, as the models do:
    their activation datt_dot); then, on Hopper, the one-kernel backward's fp32 dQ tiles (queries per tile:
    attention_sm90.cu's FusedBwdCfg), the qkv bias gradient's partial rows (per batch the larger of its query
    columns' slots, 8 or 4, and its key blocks of 128, by the widest qkv row 3 NH HS), a counter per tile and 16-byte
    slack (other GPUs: D and bias_backward's partials of that row; the plan is Hopper's, the larger)."""
    rows = 128 if head_size == 64 else 64
    tiles = B * n_head * -(-T // rows)
    bias_rows = B * max(-(-T // 128), 8 if head_size == 64 else 4)
    return B * n_head * T + tiles * rows * head_size + bias_rows * 3 * n_head * head_size + tiles + 4


def global_norm_scratch_floats(n: int) -> int:
    vectors = -(-n // 8)  # global_norm.cu: 8-element vectors, 256 threads a block, one partial per block
    return min(max(-(-vectors // 256), 1), 1024)


def lm_head_loss_scratch_floats(N: int, C: int, Vp: int) -> int:
    """lm_head.cu: the target logits, row scales, flagged rows (1 + N ints), the row sums per column tile (room for
    128-column tiles, the narrowest gemm_sm90 uses) and the scaled hidden rows (bf16), each part rounded up to 4
    floats."""
    up4 = lambda n: -(-n // 4) * 4
    return 2 * up4(N) + up4(N + 1) + up4(-(-Vp // 128) * N) + up4(-(-N * C // 2))


def gpt2_scratch_floats(cfg, B: int, T: int, grad_elements: int) -> int:
    """The CUDA backend's one scratch buffer grows to the largest request of a GPT-2 step."""
    N, C, HS = B * T, cfg.n_embd, cfg.n_embd // cfg.n_head
    return max(layernorm_backward_scratch_floats(N, C),
               lm_head_loss_scratch_floats(min(N, LM_HEAD_CHUNK_ROWS), C, cfg.padded_vocab_size),
               max(bias_backward_scratch_floats(N, oc) for oc in (3 * C, C, 4 * C)),
               matmul_backward_scratch_floats(N, 4 * C, C, False, True, True),  # fc's projection (+ fc's dbias)
               # less D: the models give it (their activation datt_dot, from attproj's backward)
               attention_backward_scratch_floats(B, T, cfg.n_head, HS) - B * cfg.n_head * T,
               global_norm_scratch_floats(grad_elements))


def batch_buffer_bytes(B: int, T: int) -> int:
    """cuda_ops.DeviceBatch: tokens, targets, sorted positions (int32, B*T each), bucket starts (B*T+1),
    the bucket count."""
    n = B * T
    return 4 * (4 * n + 2)


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of a backend's buffers."""
    param: int
    activation: int
    workspace: bool  # whether it has device workspace (scratch, cuBLASLt)


BACKEND_DTYPES = {"numpy": Dtypes(4, 4, False), "cuda": Dtypes(2, 2, True)}


def plan(cfg, B: int, T: int, world_size: int, zero_stage: int, recompute: int, backend: str = "cuda",
         master_weights: bool = True) -> dict:
    """Bytes per rank of each group (GROUPS) for training cfg at micro-batch B x T on world_size ranks."""
    if backend not in BACKEND_DTYPES:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_DTYPES)}")
    dtypes, family = BACKEND_DTYPES[backend], family_of(cfg)
    layout = family.param_layout(cfg)
    sizes = buffer_elements(layout, cfg.n_layer, world_size, zero_stage)
    fp32_acts = getattr(family, "FP32_ACTIVATIONS", frozenset())
    activations = sum(t.size * (4 if t.name in fp32_acts else dtypes.activation)
                      for t in family.activation_layout(cfg, B, T, recompute).tensors)
    master = master_weights and dtypes.param != 4
    workspace = 0
    if dtypes.workspace:
        workspace = (4 * gpt2_scratch_floats(cfg, B, T, sizes["shard"])  # the norm runs over the shard + CUBLASLT_WORKSPACE_BYTES
                     + batch_buffer_bytes(B, T))
        if zero_stage >= 2:  # zero.py's accumulation: the shard chunk, the reduced chunk and their sum in fp32
            workspace += 3 * 4 * max(u.shard_size for u in zero_units(layout, cfg.n_layer, world_size))
    return {"parameters": dtypes.param * sum(sizes["parameters"]),
            "gradients": dtypes.param * sum(sizes["gradients"]),
            "optimizer state": 4 * sizes["shard"] * (3 if master else 2),
            "activations": activations,
            "communication buffers": dtypes.param * sum(sizes["communication"]),
            "workspace": workspace}


def allocated(model, optimizer) -> dict:
    """Bytes of the buffers a trainer's model and optimizer hold, in plan()'s groups (workspace aside:
    the backend grows it during the first step)."""
    size = lambda arrays: sum(a.nbytes for a in arrays)
    held = model.storage.buffers()
    return {"parameters": size(held["parameters"]), "gradients": size(held["gradients"]),
            "optimizer state": size(optimizer.state_arrays().values()), "activations": size(model.acts.values()),
            "communication buffers": size(held["communication"])}


def format_bytes(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def table(groups: dict) -> str:
    """The groups and their total, one per line."""
    rows = [(name, groups[name]) for name in GROUPS] + [("total", sum(groups.values()))]
    return "\n".join(f"  {name:<22} {format_bytes(n):>14}" for name, n in rows)
