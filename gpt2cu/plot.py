"""Training curves from main.log files: `python -m gpt2cu.plot DIR [DIR...] -o curves.png`.

Reads llm.c's log lines (`s:N trl:X` train loss, `s:N tel:X` val loss, `s:N eval:X` HellaSwag accuracy
as a fraction), written by train.py or by llm.c itself, and the RL fields of gpt2cu.ppo (RL_KEYS: reward,
KL, entropy, clip fraction, value loss, explained variance, held-out reward); any other `key:value` field
on a line is ignored. A resumed run appends to its log from the checkpoint's step, so a step at or before one
already seen replaces that entry and everything after it (the abandoned tail of the first attempt).

One PNG: train and val loss against step (or tokens, with --tokens-per-step), and HellaSwag in percent
when some run has it; every run is a colour labelled by its directory, and reference lines (e.g. GPT-2
124M's val loss, its HellaSwag 29.4) mark the numbers to beat.
"""
from __future__ import annotations

import argparse
import os
import sys

from .extras import MissingExtra, require

KEYS = {"trl": "train loss", "tel": "val loss", "eval": "HellaSwag"}
# python -m gpt2cu.ppo's per-step fields: one panel each
RL_KEYS = {"rwd": "mean reward", "evr": "held-out mean reward", "kl": "KL to the reference", "ent": "entropy",
           "clip": "clip fraction", "vloss": "value loss", "ev": "explained variance"}
KEYS.update(RL_KEYS)


class LogError(ValueError):
    pass


def read_log(path: str) -> dict:
    """{key of KEYS: [(step, value), ...] in step order} from a main.log."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no log file: {path}")
    series = {key: [] for key in KEYS}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                fields = dict(field.split(":", 1) for field in line.split())
                step = int(fields.pop("s"))
                values = {key: float(fields[key]) for key in KEYS if key in fields}
            except (ValueError, KeyError) as e:
                raise LogError(f"{path}:{lineno}: cannot parse {line.strip()!r} (expected fields like "
                               f"s:N trl:X; {type(e).__name__}: {e})") from None
            for key, value in values.items():
                points = series[key]
                while points and points[-1][0] >= step:  # a resumed run rewrites from its checkpoint on
                    points.pop()
                points.append((step, value))
    return series


def plot_runs(runs: dict, out: str, tokens_per_step: int | None = None, ref_val_loss: float | None = None,
              ref_hellaswag: float | None = None) -> None:
    """runs: label -> read_log() series. Writes a PNG to `out`."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    has_loss = any(series["trl"] or series["tel"] for series in runs.values()) or not any(
        series[key] for series in runs.values() for key in RL_KEYS)
    has_eval = any(series["eval"] for series in runs.values())
    # one panel each: loss, HellaSwag, then the RL fields present, four to a row
    names = ["loss"] * has_loss + ["eval"] * has_eval + [k for k in RL_KEYS if any(s[k] for s in runs.values())]
    columns = min(len(names), 4)
    rows = -(-len(names) // columns)
    width = {1: 8, 2: 14}.get(columns, 5 * columns)
    fig, grid = plt.subplots(rows, columns, figsize=(width, 5 * rows), squeeze=False)
    axes = dict(zip(names, grid.flat))
    for unused in grid.flat[len(names):]:
        unused.set_visible(False)
    scale = tokens_per_step or 1
    xlabel = "tokens" if tokens_per_step else "step"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (label, series) in enumerate(runs.items()):
        color = colors[n % len(colors)]
        for key, style in (("trl", "-"), ("tel", "--")):
            if series[key]:
                steps, values = zip(*series[key])
                axes["loss"].plot([s * scale for s in steps], values, style, color=color, alpha=0.9,
                                  label=f"{label} {KEYS[key]}")
        if has_eval and series["eval"]:
            steps, values = zip(*series["eval"])
            axes["eval"].plot([s * scale for s in steps], [100 * v for v in values], "-o", markersize=3,
                              color=color, label=label)
        for key in RL_KEYS:
            if key in axes and series[key]:
                steps, values = zip(*series[key])
                axes[key].plot([s * scale for s in steps], values, "-", color=color, label=label)
    if has_loss:
        if ref_val_loss is not None:
            axes["loss"].axhline(ref_val_loss, color="red", linestyle=":", label=f"reference val loss {ref_val_loss}")
        axes["loss"].set(xlabel=xlabel, ylabel="loss", title="loss")
    if has_eval:
        if ref_hellaswag is not None:
            axes["eval"].axhline(ref_hellaswag, color="red", linestyle=":", label=f"reference {ref_hellaswag}%")
        axes["eval"].set(xlabel=xlabel, ylabel="acc_norm (%)", title="HellaSwag")
    for key in RL_KEYS:
        if key in axes:
            axes[key].set(xlabel=xlabel, title=RL_KEYS[key])
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.plot", description="Plot main.log curves of training runs.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories holding main.log")
    p.add_argument("-o", dest="out", default="curves.png", help="output PNG (default curves.png)")
    p.add_argument("--ref-val-loss", type=float, default=None, help="horizontal line on the loss panel")
    p.add_argument("--ref-hellaswag", type=float, default=None,
                   help="horizontal line on the HellaSwag panel, in percent (GPT-2 124M: 29.4)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="x axis in tokens (e.g. -d of the runs)")
    args = p.parse_args(argv)
    try:
        require("matplotlib", p.prog)
    except MissingExtra as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        p.error(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
    runs = {}
    try:
        for d in args.dirs:
            label = os.path.basename(os.path.normpath(d))
            runs[label if label not in runs else os.path.normpath(d)] = read_log(os.path.join(d, "main.log"))
    except (OSError, LogError) as e:
        p.error(str(e))
    plot_runs(runs, args.out, args.tokens_per_step, args.ref_val_loss, args.ref_hellaswag)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
