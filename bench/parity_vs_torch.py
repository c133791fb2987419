"""How closely does gpt2cu's bf16 training follow PyTorch's bf16 autocast training, and which of
gpt2cu's numeric choices move it away? Same init, same batches of the default corpus, d12, B=8, T=1024:

    python bench/parity_vs_torch.py [--steps 100] [--lr 6e-4] [--warmup 50,700] [--out losses.npz]

Every row is one 100-step training run compared with the reference (PyTorch, bf16 autocast, flash
SDPA, fp32 parameters and gradients): max and mean |loss difference| over the steps. The torch rows
change one thing each: another attention kernel (the reference's own noise floor), or one of the
choices a bf16 implementation makes -- residual stream stored in bf16, bf16 parameters rounded from an
fp32 master (to nearest or stochastically), bf16 gradients, a master copy that starts from the bf16
rounding of the init. The gpt2cu rows are the real thing.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from gpt2cu.backends import get_backend
from gpt2cu.models.gpt2 import GPTConfig, init_params
from gpt2cu.corpus import default_corpus
from gpt2cu.data import DataLoader, InMemoryBatches
from gpt2cu.dist import SingleProcess
from gpt2cu.optim import AdamWConfig
from gpt2cu.schedules import get_lr
from gpt2cu.trainer import TrainConfig, Trainer
from gpt2cu.reference.torch_gpt2 import TorchGPT

SDPA = {"flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
        "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
        "math": torch.nn.attention.SDPBackend.MATH}


@dataclass(frozen=True)
class Numerics:
    sdpa: str = "flash"
    residual: str = "fp32"      # fp32 | bf16
    params: str = "fp32"        # fp32 | nearest | stochastic: what the forward sees of the fp32 master
    grads: str = "fp32"         # fp32 | bf16
    master_init: str = "fp32"   # fp32 | bf16: the master copy starts from the init or its bf16 rounding

    def label(self):
        changed = [f"{k}={v}" for k, v in vars(self).items() if v != getattr(Numerics, k)]
        return "torch " + (", ".join(changed) or "(reference)")


def round_nearest(t, _gen=None):
    return t.bfloat16().float()


def round_stochastic(t, gen):
    """bf16 values as fp32: 16 random bits added below the bf16 mantissa, then truncated (as adamw.cu)."""
    noise = torch.randint(0, 1 << 16, t.shape, device=t.device, dtype=torch.int32, generator=gen)
    return ((t.view(torch.int32) + noise) & -65536).view(torch.float32)


def torch_losses(cfg, init, batches, schedule, nx: Numerics):
    residual = torch.bfloat16 if nx.residual == "bf16" else None
    model = TorchGPT.from_flat(cfg, init, residual_dtype=residual).cuda()
    # with rounded parameters the optimizer runs on a separate fp32 master model
    master = model if nx.params == "fp32" else TorchGPT.from_flat(cfg, init).cuda()
    opt = master.configure_optimizer(weight_decay=0.1, lr=schedule(0), betas=(0.9, 0.95), eps=1e-8, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rounder = {"nearest": round_nearest, "stochastic": round_stochastic}.get(nx.params)
    with torch.no_grad():
        if nx.master_init == "bf16":
            for p in master.parameters():
                p.copy_(round_nearest(p))
        if rounder is not None:
            for p in model.parameters():
                p.copy_(round_nearest(p))
    losses = []
    with torch.nn.attention.sdpa_kernel(SDPA[nx.sdpa]):
        for step, (x, y) in enumerate(batches):
            xt, yt = torch.from_numpy(x).long().cuda(), torch.from_numpy(y).long().cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(xt, yt)
            loss.backward()
            losses.append(loss.item())
            for pm, p in zip(master.parameters(), model.parameters()):
                g = p.grad if nx.grads == "fp32" else round_nearest(p.grad)
                pm.grad = g
            torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rounder is not None:
                with torch.no_grad():
                    for pm, p in zip(master.parameters(), model.parameters()):
                        p.copy_(rounder(pm, gen))
                        p.grad = None
    return np.array(losses)


def gpt2cu_losses(cfg, init, batches, lr, warmup, master_init="fp32"):
    """The real thing: trainer.Trainer on the CUDA backend. master_init "bf16": AdamW's master copy starts
    from the bf16 parameters instead of the fp32 init (what gpt2cu did before issue 5)."""
    B, T = batches[0][0].shape
    config = TrainConfig(batch_size=B, seq_len=T, max_steps=len(batches), recompute=1, seed=0, warmup=warmup,
                         adamw=AdamWConfig(lr=lr, weight_decay=0.1), final_lr_frac=0.1)
    trainer = Trainer(cfg, init, get_backend("cuda"), SingleProcess(), config, InMemoryBatches(batches))
    if master_init == "bf16":
        opt = trainer.optimizer
        opt.backend.from_numpy(opt.backend.to_numpy(trainer.model.params), out=opt.master)
    return np.array([trainer.step().loss for _ in batches])


TORCH_VARIANTS = (
    Numerics(sdpa="efficient"),
    Numerics(sdpa="math"),
    Numerics(residual="bf16"),
    Numerics(params="nearest"),
    Numerics(params="stochastic"),
    Numerics(grads="bf16"),
    Numerics(params="stochastic", master_init="bf16"),
    Numerics(residual="bf16", params="stochastic", grads="bf16", master_init="bf16"),  # gpt2cu today
    Numerics(params="stochastic", grads="bf16", master_init="bf16"),  # gpt2cu with an fp32 residual stream
    Numerics(params="stochastic", grads="bf16"),
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", default="50,700", help="warmup steps to try (comma separated)")
    ap.add_argument("--out", help="save every run's losses here (.npz)")
    args = ap.parse_args()
    cfg, B, T = GPTConfig.from_descriptor("d12"), 8, 1024
    init = init_params(cfg, seed=0)
    loader = DataLoader(default_corpus()[0], B, T, shuffle=False)
    batches = [loader.next_batch() for _ in range(args.steps)]
    saved = {}
    for warmup in (int(w) for w in args.warmup.split(",")):
        schedule = lambda step: get_lr("cosine", step, args.steps, args.lr, warmup, 0.1)  # noqa: E731
        ref = torch_losses(cfg, init, batches, schedule, Numerics())
        runs = [(nx.label(), lambda nx=nx: torch_losses(cfg, init, batches, schedule, nx)) for nx in TORCH_VARIANTS]
        runs += [(f"gpt2cu master_init={m}", lambda m=m: gpt2cu_losses(cfg, init, batches, args.lr, warmup, m))
                 for m in ("bf16", "fp32")]
        print(f"\nlr {args.lr} warmup {warmup}: reference loss {ref[0]:.3f} -> {ref[-1]:.3f}", flush=True)
        saved[f"w{warmup}/reference"] = ref
        for label, run in runs:
            losses = run()
            saved[f"w{warmup}/{label}"] = losses
            d = np.abs(losses - ref)
            print(f"  {label:82s} max {d.max():.4f} (step {d.argmax() + 1:3d})  mean {d.mean():.4f}", flush=True)
    if args.out:
        np.savez(args.out, **saved)


if __name__ == "__main__":
    main()
