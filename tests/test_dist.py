"""gpt2cu/dist.py: SingleProcess semantics and rank discovery in-process; MPIComm's collectives and the
abort-on-failure paths under `mpirun -np 2` and `-np 4` (tests/mpi_dist_check.py). NCCLComm needs GPUs
and is not exercised here."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from gpt2cu.dist import SingleProcess, launcher_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tests", "mpi_dist_check.py")
MPIRUN_TIMEOUT = 20  # seconds; a healthy run takes about one


def test_single_process_collectives():
    comm = SingleProcess()
    assert (comm.rank, comm.world_size, comm.local_rank) == (0, 1, 0)
    buf = np.arange(6, dtype=np.float32)
    comm.all_reduce(buf, "sum")
    comm.all_reduce(buf, "avg")
    comm.broadcast(buf)
    assert buf.tolist() == list(range(6))
    shard = np.empty(6, np.float32)
    comm.reduce_scatter(buf, shard, "avg")
    assert shard.tolist() == list(range(6))
    flat = np.empty(6, np.float32)
    comm.all_gather(shard, flat)
    assert flat.tolist() == list(range(6))
    assert comm.all_reduce_scalar(np.float32(2.5)) == 2.5 and isinstance(comm.all_reduce_scalar(1), float)
    comm.barrier()
    with pytest.raises(ValueError, match="'max'"):
        comm.all_reduce(buf, "max")
    with pytest.raises(ValueError, match="expected shard size"):
        comm.reduce_scatter(buf, np.empty(5, np.float32))


def test_launcher_env():
    assert launcher_env({}) is None
    assert launcher_env({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "0"}) == (4, 2, 0, "OMPI_COMM_WORLD_SIZE")
    assert launcher_env({"PMI_SIZE": "2", "PMI_RANK": "1"}) == (2, 1, None, "PMI_SIZE")
    # an sbatch script running python directly has SLURM_NTASKS but is not a multi-rank step
    assert launcher_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None
    assert launcher_env({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"})[:3] == (8, 5, 1)


def clean_env():
    """This environment minus any launcher variables (pytest itself might run under one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    if shutil.which("ssh") is None and shutil.which("rsh") is None:
        # Open MPI refuses to start without a remote-shell agent even for ranks on this host only
        env["OMPI_MCA_plm_rsh_agent"] = "false"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_init_alone_is_single_process_without_mpi4py():
    code = ("import sys; from gpt2cu.dist import init_distributed, install_abort_on_exception; "
            "c = init_distributed('numpy'); install_abort_on_exception(c); "
            "print(type(c).__name__, 'mpi4py' in sys.modules, sys.excepthook is sys.__excepthook__)")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SingleProcess", "False", "True"]


def mpirun_command(n: int):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    # Open MPI refuses root without the flag and more ranks than cores without the other
    flags = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else []
    return [mpirun, *flags, "-np", str(n)]


def run_ranks(ranks: int, argv, timeout: float, env=None, cwd=REPO):
    """(exit status, stdout + stderr) of argv on `ranks` ranks (1: run directly, no mpirun); a run that
    outlives the timeout counts as a hang and its whole process group is killed so no rank is left behind."""
    cmd = ([] if ranks == 1 else mpirun_command(ranks)) + list(argv)
    proc = subprocess.Popen(cmd, env=env or clean_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`{' '.join(cmd)}` hung for {timeout} s:\n{out}")
    return proc.returncode, out


def mpirun(n: int, *args):
    """(exit status, stdout + stderr) of the check script on n >= 2 ranks."""
    return run_ranks(n, [sys.executable, CHECK, *args], MPIRUN_TIMEOUT)


@pytest.mark.parametrize("n", [2, 4])
def test_mpi_collectives(n):
    code, out = mpirun(n)
    assert code == 0, out
    assert f"all collectives OK on {n} ranks" in out


@pytest.mark.parametrize("n", [2, 4])
def test_exception_on_one_rank_aborts_all(n):
    code, out = mpirun(n, "raise")
    assert code != 0, out
    assert f"[rank 1/{n}] RuntimeError: deliberate failure on rank 1" in out


def test_sys_exit_on_one_rank_aborts_all():
    code, out = mpirun(2, "exit")
    assert code == 3, out
    assert "[rank 1/2] exiting with status 3" in out


def test_hung_rank_is_aborted_by_the_watchdog():
    code, out = mpirun(2, "hang")
    assert code != 0, out
    assert "no progress for" in out and "aborting all ranks" in out, out
