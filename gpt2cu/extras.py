"""Optional packages and the extras that install them: a missing one is one line naming the extra.

    plt = require("matplotlib.pyplot", "plot", "python -m gpt2cu.plot")

raises MissingExtra("python -m gpt2cu.plot needs matplotlib: pip install 'gpt2cu[plot]'"), which every
command-line entry point turns into that line on stderr and exit code 2 (no traceback).
"""
from __future__ import annotations

import importlib

# top-level module -> (distribution to name, extra of pyproject.toml that brings it)
EXTRAS = {
    "matplotlib": ("matplotlib", "plot"),
    "safetensors": ("safetensors", "hf"),
    "mpi4py": ("mpi4py", "mpi"),
    "cupy": ("cupy-cuda13x", "cuda"),
    "cupyx": ("cupy-cuda13x", "cuda"),
}


class MissingExtra(ImportError):
    """An optional package is not importable; str() is the one-line message for the user."""


def install_hint(module: str) -> str:
    package, extra = EXTRAS[module.split(".")[0]]
    return f"pip install 'gpt2cu[{extra}]' (or pip install {package})"


def require(module: str, purpose: str):
    """Imports `module` (a key of EXTRAS, or a submodule of one) or raises MissingExtra naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        root = module.split(".")[0]
        found = getattr(e, "name", None)
        # an ImportError from inside the package (a broken install) is not a missing package: keep it
        if found is not None and found.split(".")[0] != root:
            raise
        raise MissingExtra(f"{purpose} needs {EXTRAS[root][0]}, which is not installed: "
                           f"{install_hint(root)}") from None
