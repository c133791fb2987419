"""A missing optional package is one line naming the extra that installs it, exit code 2, no traceback.

Each case runs the command in a subprocess where the package is made unimportable with a
`sys.modules[name] = None` shim (nothing is uninstalled), as a user without that extra would run it."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs `python -m MODULE ARGS...` after hiding the modules named in HIDE (comma separated); FAKE_GPU puts
# a stand-in CuPy that reports one device, to reach the check for the compiled extension
SHIM = """
import os, runpy, sys, types
for name in filter(None, os.environ["HIDE"].split(",")):
    sys.modules[name] = None
if os.environ.get("FAKE_GPU"):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    sys.modules["cupy"] = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_without(hidden, module, *args, env=None, fake_gpu=False):
    full_env = dict(os.environ, HIDE=",".join(hidden), PYTHONUNBUFFERED="1", **(env or {}))
    if fake_gpu:
        full_env["FAKE_GPU"] = "1"
    return subprocess.run([sys.executable, "-c", SHIM, module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_naming(r, extra):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, r.stderr
    assert f"gpt2cu[{extra}]" in errors[0], r.stderr


def test_plot_without_matplotlib(tmp_path):
    (tmp_path / "main.log").write_text("s:1 trl:3.0\n")
    r = run_without(["matplotlib"], "gpt2cu.plot", str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert_one_line_naming(r, "plot")
    assert not (tmp_path / "x.png").exists()


def test_export_without_safetensors(tmp_path):
    from gpt2cu.checkpoint import write_model
    from gpt2cu.models.gpt2 import GPTConfig, init_params
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, max_seq_len=8, vocab_size=16, padded_vocab_size=16)
    write_model(str(tmp_path / "m.bin"), cfg, init_params(cfg))
    r = run_without(["safetensors", "safetensors.numpy"], "gpt2cu.export", str(tmp_path / "m.bin"),
                    str(tmp_path / "hf"))
    assert_one_line_naming(r, "hf")


def test_train_from_hf_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"n_layer": 1, "n_head": 1, "n_embd": 8}')
    r = run_without(["safetensors", "safetensors.numpy"], "gpt2cu.train", "--backend", "numpy",
                    "-e", str(tmp_path), "-x", "0")
    assert_one_line_naming(r, "hf")


@pytest.mark.parametrize("rank", [0, 1])
def test_several_ranks_without_mpi4py(rank):
    """As under `mpirun -np 2`: the launcher's variables are set but mpi4py cannot be imported. Rank 0
    says why in one line; the other ranks exit with the same code silently (no communicator to agree
    through, and one message is enough)."""
    launcher = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)}
    r = run_without(["mpi4py"], "gpt2cu.train", "--backend", "numpy", "-x", "0", env=launcher)
    if rank == 0:
        assert_one_line_naming(r, "mpi")
    else:
        assert r.returncode == 2 and r.stderr == "", r.stderr


def test_cuda_backend_without_cupy():
    r = run_without(["cupy"], "gpt2cu.train", "--backend", "cuda", "-x", "0")
    assert_one_line_naming(r, "cuda")


def test_cuda_backend_without_the_compiled_extension():
    r = run_without(["gpt2cu._kernels"], "gpt2cu.train", "--backend", "cuda", "-x", "0", fake_gpu=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "without its CUDA extension" in errors[0], r.stderr


def test_sample_without_safetensors_reading_an_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"n_layer": 1, "n_head": 1, "n_embd": 8}')
    r = run_without(["safetensors", "safetensors.numpy"], "gpt2cu.sample", str(tmp_path), "--backend", "numpy")
    assert_one_line_naming(r, "hf")


def test_require_keeps_errors_from_inside_an_installed_package():
    """An ImportError raised inside an installed package (a broken install) is not a missing extra."""
    from gpt2cu.extras import MissingExtra, require
    sys.modules["matplotlib"] = None
    try:
        with pytest.raises(MissingExtra, match=r"gpt2cu\[plot\]"):
            require("matplotlib", "plotting")
    finally:
        del sys.modules["matplotlib"]
    err = ImportError("cannot import name 'x' from 'numpy.core'", name="numpy.core")
    assert np  # numpy is importable: require("numpy...") is not an extra, an inner error must surface
    import gpt2cu.extras as extras
    original = extras.importlib.import_module
    extras.importlib.import_module = lambda name: (_ for _ in ()).throw(err)
    try:
        with pytest.raises(ImportError) as info:
            require("matplotlib", "plotting")
        assert not isinstance(info.value, MissingExtra)
    finally:
        extras.importlib.import_module = original
