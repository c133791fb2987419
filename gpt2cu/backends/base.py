"""The backend interface: every op the model families run and every buffer method the trainer, optimizer
and decoder use. NumpyBackend (float32 host arrays, the oracle) and CudaBackend (bf16 kernels) both
implement all of it; callers never test which backend they hold.

Ops write their outputs (first arguments) in place; "+=" in docs/architecture.md's table marks the ones
that accumulate. A batch goes in through upload_batch (or set_batch), whose result is passed to the ops
that need more than its token arrays (the CUDA encoder backward reads the batch's token sort).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class Batch:
    """An uploaded batch: (B, T) int32 tokens and targets (None: forward only), in the backend's arrays.
    A backend may subclass it to carry what its ops precompute from the tokens."""
    tokens: object
    targets: object = None


POLICY_TERMS = 4  # per row: old log p, advantage, reference log p, KL coefficient


@dataclass(frozen=True)
class PolicyLoss:
    """fused_classifier's policy-gradient loss (gpt2cu/rl/ppo.py): terms (..., POLICY_TERMS) float32 of the
    backend, one row per position [old log p, advantage, reference log p, KL coefficient], and the ratio's
    clip range; numpy_ops.policy_weights is the loss and the weights it puts on each row's gradient."""
    terms: object
    clip: float

    def rows(self, rows: slice) -> "PolicyLoss":
        """The terms of a slice of the flattened rows (an LM-head chunk)."""
        return PolicyLoss(self.terms.reshape(-1, POLICY_TERMS)[rows], self.clip)


VALUE_TERMS = 3  # per row: old value, return, weight


@dataclass(frozen=True)
class ValueLoss:
    """scalar_head_forward's value loss (PPO's clipped value loss, gpt2cu/rl/ppo.py): terms (..., VALUE_TERMS)
    float32 of the backend, one row per position [old value, return, weight], the value's clip range, and
    the scale on the gradient it leaves for scalar_head_backward; numpy_ops.clipped_value_loss is the loss."""
    terms: object
    clip: float
    scale: float


class Backend(ABC):
    name: str               # "numpy" | "cuda"
    checkpoint_dtype: str   # the model-file dtype its parameters round-trip exactly: "fp32" | "bf16"
    xp: object              # the array module of its arrays: numpy or cupy
    kv_cache_attention: str  # KVCacheDecoder's default attention ("query" | "kernel", kv_cache.py)
    stream = None           # the device queue the ops run on, which collectives must join (None: host)

    # ---- buffers ----------------------------------------------------------------------------------
    @abstractmethod
    def zeros(self, shape, fp32=False, param=False):
        """Zeros in the parameter dtype (param=True), float32 (fp32=True), or the activation dtype."""

    @abstractmethod
    def upload_params(self, host_fp32, n, out=None):
        """A flat parameter buffer of n >= host_fp32.size elements (zero padded), or written into out."""

    @abstractmethod
    def to_numpy(self, a):
        """A float32 (or integer) host copy, after the work queued on the array is done."""

    @abstractmethod
    def from_numpy(self, host, out=None):
        """A backend copy of a host array, or the host array copied into out (same shape and dtype)."""

    @abstractmethod
    def fp32_copy(self, a):
        """A float32 backend copy of a parameter-dtype array (master weights)."""

    @abstractmethod
    def activation_to_fp32(self, a):
        """The activation-dtype array a widened to float32 (exactly), as an array of xp."""

    @abstractmethod
    def store_fp32(self, out, f32):
        """Writes a float32 xp array into the activation-dtype array out, rounding to nearest."""

    @abstractmethod
    def synchronize(self):
        """Waits for all queued work."""

    def on_stream(self):
        """A context in which array-module (xp) work joins the backend's queue of work."""
        return contextlib.nullcontext()

    # ---- batches ------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_batch(self, inputs, targets):
        """The host half of an upload (may overlap the device's work on the previous batch)."""

    @abstractmethod
    def upload_batch(self, prepared) -> Batch:
        """Queues a prepared batch's copies; returns the Batch the ops read (at fixed addresses per shape,
        so a captured graph can replay on later batches)."""

    def set_batch(self, inputs, targets=None) -> Batch:
        """prepare_batch + upload_batch; targets None: a forward-only batch."""
        return self.upload_batch(self.prepare_batch(inputs, targets))

    # ---- running and reporting ------------------------------------------------------------------------
    @abstractmethod
    def select_device(self, device: int):
        """Makes `device` (the local rank's GPU) the one this backend runs on."""

    @abstractmethod
    def graphed(self, fn, enabled=True):
        """fn, or a version of it captured once and replayed (its arguments at fixed addresses)."""

    @abstractmethod
    def mean_loss(self, losses) -> float:
        """The mean of a losses array, on the host."""

    @abstractmethod
    def mean_loss_async(self, losses):
        """The mean without waiting; float() of the result waits for it."""

    @abstractmethod
    def read_scalars_async(self, *arrays):
        """The first element of each float32 array, copied to the host behind the work queued so far: the
        result's values() waits for that copy alone and returns floats (work queued after it runs on)."""

    @abstractmethod
    def loss_sum(self, pending):
        """The sum of mean_loss_async results as a (1,) float array of the backend, without waiting."""

    @abstractmethod
    def adamw_scalars(self, lr, step, grad_scale, seed, beta1, beta2):
        """The per-step values adamw_update reads (device memory on CUDA, so a captured update replays)."""

    @abstractmethod
    def adamw_scalars_clipped(self, lr, step, seed, beta1, beta2, norm_squared, loss, max_norm):
        """adamw_scalars with grad_scale = optim.clip_scale(sqrt(norm_squared[0]), max_norm), and the update
        skipped (adamw_update changes nothing) when that norm or loss[0] (loss may be None) is not finite:
        both read where they are (the device), so no host read stands between the backward and the update."""

    @abstractmethod
    def device_name(self) -> str: ...

    @abstractmethod
    def mfu(self, flops_per_second):
        """Percent of the device's dense bf16 peak, or None where it has no meaningful peak."""

    @abstractmethod
    def peak_memory(self) -> int: ...

    # ---- ops (contracts: docs/architecture.md) --------------------------------------------------------
    @abstractmethod
    def zero_(self, a): ...

    @abstractmethod
    def accumulate(self, out, x): ...

    @abstractmethod
    def gather_rows(self, out, src, index): ...

    @abstractmethod
    def scatter_rows(self, out, src, index): ...

    @abstractmethod
    def encoder_forward(self, out, tokens, wte, wpe): ...

    @abstractmethod
    def encoder_backward(self, dwte, dwpe, dout, batch: Batch): ...

    @abstractmethod
    def layernorm_forward(self, out, mean, rstd, inp, weight, bias): ...

    @abstractmethod
    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sum=None): ...

    @abstractmethod
    def matmul_forward(self, out, inp, weight, bias=None, gelu_pre=None, residual=None):
        """out = inp @ weight^T + bias; with gelu_pre: gelu_pre = that, out = gelu(gelu_pre); with residual (not
        with gelu_pre): out = that + residual, a block's residual add (residual may be out itself)."""

    @abstractmethod
    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, dinp_gelu_pre=None, dinp_gelu_dbias=None,
                        dinp_head_dot=None, head_dot_with=None, gelu_of_pre=None):
        """dinp = dout @ weight (times gelu'(dinp_gelu_pre)), dweight += dout^T @ inp, dbias += colsum(dout);
        dinp_gelu_dbias (with dinp_gelu_pre) += colsum(dinp): the gradient of the bias inside dinp_gelu_pre;
        dinp_head_dot (B, NH, T) = per head, the row dot products of dinp (as stored) and head_dot_with (the
        attention backward's D when dinp is the gradient of the attention output head_dot_with); gelu_of_pre
        (with dinp_gelu_pre) = gelu(dinp_gelu_pre), written before dweight reads inp, which may be it (the
        forward's activation recomputed where its pre is read anyway; gelu_forward's values)."""

    @abstractmethod
    def gelu_forward(self, out, inp): ...

    @abstractmethod
    def gelu_backward(self, dinp, dout, inp): ...

    @abstractmethod
    def attention_forward(self, out, lse, qkv, n_head): ...

    @abstractmethod
    def attention_backward(self, dqkv, dout, qkv, out, lse, n_head, dout_head_dot=None, dqkv_bias=None):
        """dqkv overwritten; dout_head_dot: D given (else computed); dqkv_bias (the qkv projection's bias gradient)
        += the column sums of dqkv as stored (on Hopper summed by the attention kernel itself)."""

    @abstractmethod
    def fused_classifier(self, losses, logits, targets, dloss, vocab_size, policy=None, entropy=None): ...

    @abstractmethod
    def lm_head_loss(self, losses, dhidden, dweight, logits, hidden, weight, targets, dloss, vocab_size):
        """The LM head and its softmax cross-entropy on the rows of hidden (N, C), weight (Vp, C): losses (N,);
        with dloss != 0 also dhidden (N, C) = dlogits @ weight and dweight (Vp, C) += dlogits^T @ hidden. logits
        (N, Vp) is workspace (what it holds afterwards is the backend's). numpy: matmul_forward, fused_classifier,
        matmul_backward; CUDA on Hopper without forming dlogits (kernels/lm_head.cu)."""

    @abstractmethod
    def scalar_head_forward(self, values, losses, inp, head, value_loss=None): ...

    @abstractmethod
    def scalar_head_backward(self, dinp, dhead, dvalues, inp, head): ...

    # ---- the LLaMA family's ops -------------------------------------------------------------------
    @abstractmethod
    def embedding_forward(self, out, tokens, wte): ...

    @abstractmethod
    def embedding_backward(self, dwte, dout, batch: Batch): ...

    @abstractmethod
    def rmsnorm_forward(self, out, rstd, inp, weight, eps): ...

    @abstractmethod
    def rmsnorm_backward(self, dinp, dweight, dout, inp, weight, rstd): ...

    @abstractmethod
    def rope_forward(self, out, inp, cos, sin, n_head, n_kv_head): ...

    @abstractmethod
    def rope_backward(self, dinp, dout, cos, sin, n_head, n_kv_head): ...

    @abstractmethod
    def swiglu_forward(self, out, inp): ...

    @abstractmethod
    def swiglu_backward(self, dinp, dout, inp): ...

    @abstractmethod
    def attention_forward_gqa(self, out, lse, qkv, n_head, n_kv_head): ...

    @abstractmethod
    def attention_backward_gqa(self, dqkv, dout, qkv, out, lse, n_head, n_kv_head, dout_head_dot=None,
                               dqkv_bias=None): ...

    # ---- the KV-cache decoders' ---------------------------------------------------------------------
    @abstractmethod
    def decode_attention(self, out, qkv, n_head, n_kv_head): ...

    @abstractmethod
    def sample_logits(self, tokens, logprobs, logits, uniforms, vocab_size, temperature, top_k=None): ...

    @abstractmethod
    def global_norm_squared(self, grads): ...

    @abstractmethod
    def adamw_update(self, params, master, grads, m, v, scalars, beta1, beta2, eps, weight_decay,
                     rounding_salt=0): ...
