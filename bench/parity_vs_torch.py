"""How closely does gpt2cu's bf16 training follow PyTorch's bf16 autocast training, and how closely does
PyTorch follow itself? Same init, same batches of the default corpus, d12, B=8, T=1024, 100 steps:

    python bench/parity_vs_torch.py [--warmup 10,50] [--steps 100]

prints max and mean |loss difference| for gpt2cu vs torch (flash SDPA), torch (math SDPA) vs torch (flash
SDPA), and gpt2cu vs torch (math SDPA). The second line is the reference's own bf16 noise floor.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from gpt2cu import optim
from gpt2cu.backends import get_backend
from gpt2cu.config import GPTConfig
from gpt2cu.corpus import default_corpus
from gpt2cu.data import DataLoader
from gpt2cu.dist import SingleProcess
from gpt2cu.model import GPT, init_params
from gpt2cu.torch_reference import TorchGPT


def gpt2cu_losses(cfg, init, batches, schedule):
    backend = get_backend("cuda")
    B, T = batches[0][0].shape
    model = GPT(cfg, backend, B, T, init, recompute=1)
    opt = optim.AdamW(backend, model, (0, model.layout.total), optim.AdamWConfig(weight_decay=0.1))
    losses = []
    for step, (x, y) in enumerate(batches):
        tok, tgt = backend.set_batch(x, y)
        model.forward(tok, tgt, dloss=1.0 / (B * T))
        model.backward(tok)
        losses.append(backend.mean_loss(model.acts["losses"]))
        norm = opt.reduce_and_norm(SingleProcess(), 0)
        opt.step(schedule(step), step + 1, optim.clip_scale(norm, 1.0), seed=step)
        model.zero_grad()
    return np.array(losses)


def torch_losses(cfg, init, batches, schedule, sdpa_backend):
    ref = TorchGPT.from_flat(cfg, init).cuda()
    opt = ref.configure_optimizer(weight_decay=0.1, lr=schedule(0), betas=(0.9, 0.95), eps=1e-8, fused=True)
    losses = []
    with torch.nn.attention.sdpa_kernel(sdpa_backend):
        for step, (x, y) in enumerate(batches):
            xt, yt = torch.from_numpy(x).long().cuda(), torch.from_numpy(y).long().cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = ref(xt, yt)
            loss.backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return np.array(losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", default="10,50", help="warmup steps to try (comma separated)")
    args = ap.parse_args()
    cfg, B, T = GPTConfig.from_descriptor("d12"), 8, 1024
    init = init_params(cfg, seed=0)
    loader = DataLoader(default_corpus()[0], B, T, shuffle=False)
    batches = [loader.next_batch() for _ in range(args.steps)]
    flash, math = torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.MATH
    for warmup in (int(w) for w in args.warmup.split(",")):
        schedule = lambda step: optim.get_lr("cosine", step, args.steps, args.lr, warmup, 0.1)  # noqa: E731
        ours = gpt2cu_losses(cfg, init, batches, schedule)
        ref_flash = torch_losses(cfg, init, batches, schedule, flash)
        ref_math = torch_losses(cfg, init, batches, schedule, math)
        for name, a, b in (("gpt2cu vs torch", ours, ref_flash), ("torch-math vs torch", ref_math, ref_flash),
                           ("gpt2cu vs torch-math", ours, ref_math)):
            d = np.abs(a - b)
            print(f"lr {args.lr} warmup {warmup:3d} | {name:21s} | max {d.max():.4f} (step {d.argmax() + 1:3d}) | "
                  f"mean {d.mean():.4f} | final {a[-1]:.3f} / {b[-1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
