"""One communicator interface for data-parallel training, and its three implementations:
SingleProcess (world 1, every op the identity), MPIComm (mpi4py over numpy arrays: the numpy backend
under mpirun) and NCCLComm (cupy.cuda.nccl over CuPy arrays: the CUDA backend, one GPU per rank).

The interface (buffers are flat, C-contiguous and written in place; op is "sum" or "avg"):
  rank, world_size, local_rank
  all_reduce(buf, op)                      every rank ends with the reduction of all ranks' buf
  reduce_scatter(send_flat, recv_shard, op)  rank r gets the reduction of send_flat[r*S:(r+1)*S]
  all_gather(send_shard, recv_flat)        recv_flat[r*S:(r+1)*S] = rank r's send_shard
  all_reduce_start(buf, op), all_gather_start(send_shard, recv_flat) -> handle
                                           the same collectives started (NCCL: on a communication
                                           stream); finish(handles) waits for them
  broadcast(buf, root=0)
  all_reduce_scalar(x) -> float            the sum over ranks of a host number
  barrier()
  abort(code)                              ends every rank now

init_distributed() finds the rank from the launcher's environment (mpirun, mpiexec, srun), and
install_abort_on_exception() / abort_on_failure() make a failing rank take the others down with it
instead of leaving them blocked in a collective.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback

import numpy as np

from .extras import require

OPS = ("sum", "avg")

# NCCL 2.10.3 introduced both ncclBfloat16 and ncclAvg (its version code is 21003)
_NCCL_BF16_AVG_VERSION = 21003


def _check_op(op: str):
    if op not in OPS:
        raise ValueError(f"unknown reduction {op!r}: expected 'sum' or 'avg'")


def _check_shards(flat, shard, world_size: int, what: str):
    if flat.dtype != shard.dtype:
        raise TypeError(f"{what}: dtypes differ ({flat.dtype} vs {shard.dtype})")
    if flat.size != shard.size * world_size:
        raise ValueError(f"{what}: the flat buffer has {flat.size} elements, expected shard size "
                         f"{shard.size} x {world_size} ranks = {shard.size * world_size}")


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not stop an abort
            pass


class SingleProcess:
    """World size 1: reductions are the identity, for numpy and CuPy arrays alike."""
    rank, world_size, local_rank = 0, 1, 0
    communicates = False  # callers may skip the collectives altogether

    def use_stream(self, stream):
        """Host collectives: nothing to join (the NCCL communicator enqueues on `stream`)."""

    def all_reduce(self, buf, op: str = "sum"):
        _check_op(op)

    def reduce_scatter(self, send_flat, recv_shard, op: str = "sum"):
        _check_op(op)
        _check_shards(send_flat, recv_shard, 1, "reduce_scatter")
        recv_shard[...] = send_flat

    def all_gather(self, send_shard, recv_flat):
        _check_shards(recv_flat, send_shard, 1, "all_gather")
        recv_flat[...] = send_shard

    def broadcast(self, buf, root: int = 0):
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a world of 1")

    def all_reduce_scalar(self, x) -> float:
        return float(x)

    def all_reduce_start(self, buf, op: str = "sum"):
        _check_op(op)

    def all_gather_start(self, send_shard, recv_flat):
        self.all_gather(send_shard, recv_flat)

    def finish(self, handles):
        pass

    def barrier(self):
        pass

    def abort(self, code: int = 1):
        _flush()
        os._exit(code)


class MPIComm:
    """mpi4py over host numpy arrays (the numpy backend). Reductions need a floating dtype: bf16 bits
    stored as uint16 would be summed as integers."""
    communicates = True

    def use_stream(self, stream):
        """Host collectives: nothing to join (the NCCL communicator enqueues on `stream`)."""

    def __init__(self, comm=None, local_rank: int | None = None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = _mpi_local_rank(self.comm) if local_rank is None else local_rank

    def _reducible(self, buf, what: str):
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            raise TypeError(f"{what}: MPIComm needs C-contiguous numpy arrays")
        if buf.dtype.kind != "f":
            raise TypeError(f"{what}: MPIComm reduces floating-point arrays only, got {buf.dtype}")

    def _average(self, buf):
        np.divide(buf, buf.dtype.type(self.world_size), out=buf)

    def all_reduce(self, buf, op: str = "sum"):
        _check_op(op)
        self._reducible(buf, "all_reduce")
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if op == "avg":
            self._average(buf)

    def all_reduce_start(self, buf, op: str = "sum"):
        """Start an in-place all-reduce; finish() completes it. The same collective as all_reduce."""
        _check_op(op)
        self._reducible(buf, "all_reduce_start")
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), buf, op

    def _gatherable(self, send_shard, recv_flat, what: str):
        for buf in (send_shard, recv_flat):
            if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
                raise TypeError(f"{what}: MPIComm needs C-contiguous numpy arrays")
        _check_shards(recv_flat, send_shard, self.world_size, what)

    def all_gather_start(self, send_shard, recv_flat):
        """Start an all-gather into a separate buffer; finish() completes it."""
        self._gatherable(send_shard, recv_flat, "all_gather_start")
        if np.shares_memory(send_shard, recv_flat):
            raise ValueError("all_gather_start: the shard must not overlap the gathered buffer")
        return self.comm.Iallgather(send_shard, recv_flat), recv_flat, "sum"

    def finish(self, handles):
        self.MPI.Request.Waitall([request for request, _, _ in handles])
        for _, buf, op in handles:
            if op == "avg":
                self._average(buf)

    def reduce_scatter(self, send_flat, recv_shard, op: str = "sum"):
        _check_op(op)
        self._reducible(send_flat, "reduce_scatter")
        self._reducible(recv_shard, "reduce_scatter")
        _check_shards(send_flat, recv_shard, self.world_size, "reduce_scatter")
        # MPI forbids overlapping send and receive buffers; ZeRO reduces a gradient buffer into its own shard
        if np.shares_memory(send_flat, recv_shard):
            send_flat = send_flat.copy()
        self.comm.Reduce_scatter_block(send_flat, recv_shard, op=self.MPI.SUM)
        if op == "avg":
            self._average(recv_shard)

    def all_gather(self, send_shard, recv_flat):
        self._gatherable(send_shard, recv_flat, "all_gather")
        if np.shares_memory(send_shard, recv_flat):
            send_shard = send_shard.copy()
        self.comm.Allgather(send_shard, recv_flat)

    def broadcast(self, buf, root: int = 0):
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            raise TypeError("broadcast: MPIComm needs a C-contiguous numpy array")
        self.comm.Bcast(buf, root=root)

    def all_reduce_scalar(self, x) -> float:
        return float(self.comm.allreduce(float(x), op=self.MPI.SUM))

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code: int = 1):
        _flush()
        self.comm.Abort(code)


class NCCLComm:
    """cupy.cuda.nccl over CuPy arrays, one GPU per rank; MPI carries the NCCL unique id, the host
    scalars and the barrier. Collectives are enqueued on `stream` (a cupy Stream; None: the current
    stream at each call), so the trainer calls use_stream(backend.stream) once the device is chosen.
    bf16 tensors are uint16 CuPy arrays of raw bits and travel as ncclBfloat16."""
    communicates = True  # even with one rank: that is how the NCCL path is tested on one GPU

    def __init__(self, mpi: MPIComm, stream=None):
        import cupy as cp
        from cupy.cuda import nccl
        if not getattr(nccl, "available", False):
            raise RuntimeError("this CuPy was built without NCCL: install a CuPy wheel with NCCL support")
        self.cp, self.nccl_mod, self.mpi = cp, nccl, mpi
        self.rank, self.world_size, self.local_rank = mpi.rank, mpi.world_size, mpi.local_rank
        self.stream = stream
        self._comm_stream = None  # created by the first started collective
        self.version = nccl.get_version()
        new_enough = self.version >= _NCCL_BF16_AVG_VERSION
        # older CuPy builds do not export the newer enum values; they are fixed by nccl.h
        self._avg = getattr(nccl, "NCCL_AVG", 4) if new_enough else None
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float16): nccl.NCCL_FLOAT16,
                        np.dtype(np.float64): nccl.NCCL_FLOAT64, np.dtype(np.int32): nccl.NCCL_INT32}
        if new_enough:
            self._dtypes[np.dtype(np.uint16)] = getattr(nccl, "NCCL_BFLOAT16", 9)
        count = cp.cuda.runtime.getDeviceCount()
        if self.local_rank >= count:
            raise RuntimeError(f"rank {self.rank} has local rank {self.local_rank} but this node shows {count} "
                               f"GPU(s): run at most one rank per GPU")
        # the communicator binds to the current device: the GPU this rank drives
        cp.cuda.Device(self.local_rank).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi.comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)

    def use_stream(self, stream):
        self.stream = stream

    def _stream(self):
        return self.stream if self.stream is not None else self.cp.cuda.get_current_stream()

    def _stream_ptr(self) -> int:
        return self._stream().ptr

    def _dtype(self, buf, what: str) -> int:
        if not isinstance(buf, self.cp.ndarray) or not buf.flags.c_contiguous:
            raise TypeError(f"{what}: NCCLComm needs C-contiguous CuPy arrays")
        if buf.dtype not in self._dtypes:
            need = (f" (bf16 needs NCCL >= 2.10.3, this is {self.version})" if buf.dtype == np.uint16 else "")
            raise TypeError(f"{what}: no NCCL type for {buf.dtype}{need}")
        return self._dtypes[buf.dtype]

    def _reduce_op(self, op: str) -> tuple[int, bool]:
        """(NCCL op, whether to divide by world_size afterwards)."""
        _check_op(op)
        if op == "sum":
            return self.nccl_mod.NCCL_SUM, False
        if self._avg is not None:
            return self._avg, False
        return self.nccl_mod.NCCL_SUM, True

    def _scale(self, buf):
        # only reached without ncclAvg, where bf16 is unavailable too: buf is a float array
        with self._stream():
            buf *= buf.dtype.type(1.0 / self.world_size)

    def _check_overlap(self, flat, shard, what: str):
        # NCCL's in-place form is the shard sitting at this rank's slot of the flat buffer; other overlaps are undefined
        lo, hi, p = flat.data.ptr, flat.data.ptr + flat.nbytes, shard.data.ptr
        if lo <= p < hi and p != lo + self.rank * shard.nbytes:
            raise ValueError(f"{what}: the shard overlaps the flat buffer but is not rank {self.rank}'s slot")

    def all_reduce(self, buf, op: str = "sum"):
        nccl_op, scale = self._reduce_op(op)
        dtype = self._dtype(buf, "all_reduce")
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nccl_op, self._stream_ptr())
        if scale:
            self._scale(buf)

    def all_reduce_start(self, buf, op: str = "sum"):
        """The same all-reduce on a communication stream that waits for the compute stream's work so far,
        so the compute stream goes on (the backward of earlier layers) while it runs; finish() joins."""
        comm_stream = self._communication_stream()
        nccl_op, scale = self._reduce_op(op)
        dtype = self._dtype(buf, "all_reduce_start")
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nccl_op, comm_stream.ptr)
        return buf, scale

    def _communication_stream(self):
        """The stream started collectives run on, made to wait for the compute stream's work so far."""
        if self._comm_stream is None:
            self._comm_stream = self.cp.cuda.Stream(non_blocking=True)
        self._comm_stream.wait_event(self._stream().record())
        return self._comm_stream

    def all_gather_start(self, send_shard, recv_flat):
        """The same all-gather on the communication stream, after the compute stream's work so far (which
        includes the last reads of recv_flat's previous contents); finish() joins."""
        comm_stream = self._communication_stream()
        dtype = self._dtype(send_shard, "all_gather_start")
        self._dtype(recv_flat, "all_gather_start")
        _check_shards(recv_flat, send_shard, self.world_size, "all_gather_start")
        self._check_overlap(recv_flat, send_shard, "all_gather_start")
        self.comm.allGather(send_shard.data.ptr, recv_flat.data.ptr, send_shard.size, dtype, comm_stream.ptr)
        return recv_flat, False

    def finish(self, handles):
        if self._comm_stream is not None:
            self._stream().wait_event(self._comm_stream.record())
        for buf, scale in handles:
            if scale:
                self._scale(buf)

    def reduce_scatter(self, send_flat, recv_shard, op: str = "sum"):
        nccl_op, scale = self._reduce_op(op)
        dtype = self._dtype(send_flat, "reduce_scatter")
        self._dtype(recv_shard, "reduce_scatter")
        _check_shards(send_flat, recv_shard, self.world_size, "reduce_scatter")
        self._check_overlap(send_flat, recv_shard, "reduce_scatter")
        self.comm.reduceScatter(send_flat.data.ptr, recv_shard.data.ptr, recv_shard.size, dtype, nccl_op,
                                self._stream_ptr())
        if scale:
            self._scale(recv_shard)

    def all_gather(self, send_shard, recv_flat):
        dtype = self._dtype(send_shard, "all_gather")
        self._dtype(recv_flat, "all_gather")
        _check_shards(recv_flat, send_shard, self.world_size, "all_gather")
        self._check_overlap(recv_flat, send_shard, "all_gather")
        self.comm.allGather(send_shard.data.ptr, recv_flat.data.ptr, send_shard.size, dtype, self._stream_ptr())

    def broadcast(self, buf, root: int = 0):
        dtype = self._dtype(buf, "broadcast")
        self.comm.bcast(buf.data.ptr, buf.size, dtype, root, self._stream_ptr())

    def all_reduce_scalar(self, x) -> float:
        return self.mpi.all_reduce_scalar(x)

    def barrier(self):
        self.mpi.barrier()

    def abort(self, code: int = 1):
        # MPI_Abort has mpirun kill every rank, including those blocked inside an NCCL kernel
        self.mpi.abort(code)


# ---- rank discovery ---------------------------------------------------------------------------------

# (size, rank, local rank) variables of the launchers: Open MPI, MPICH / Intel MPI (Hydra), Slurm's srun
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    # SLURM_NTASKS is also set in a batch script that runs python directly; the step variable is srun's
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"),
)


def launcher_env(environ=None) -> tuple[int, int, int | None, str] | None:
    """(world_size, rank, local_rank or None, variable name) from the first launcher whose variables
    are set, or None when the process was started on its own."""
    environ = os.environ if environ is None else environ
    for size_var, rank_var, local_var in _LAUNCHER_VARS:
        if size_var in environ and rank_var in environ:
            local = environ.get(local_var)
            return int(environ[size_var]), int(environ[rank_var]), (int(local) if local is not None else None), size_var
    return None


def _mpi_local_rank(comm) -> int:
    from mpi4py import MPI
    env = launcher_env()
    if env is not None and env[2] is not None:
        return env[2]
    # no launcher variable: rank among the processes sharing this node's memory
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local = node.Get_rank()
    node.Free()
    return local


def init_distributed(backend_name: str):
    """The communicator for this process: SingleProcess when launched alone (mpi4py is not even
    imported), else MPIComm for the numpy backend or NCCLComm for the cuda backend (GPU = local rank)."""
    if backend_name not in ("numpy", "cuda"):
        raise ValueError(f"unknown backend {backend_name!r}: expected 'numpy' or 'cuda'")
    env = launcher_env()
    if env is None or env[0] == 1:
        return SingleProcess()
    size, rank, _, var = env
    require("mpi4py", f"running as rank {rank} of {size} ({var} is set)")
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() != size:
        raise RuntimeError(f"{var} says {size} ranks but MPI sees {MPI.COMM_WORLD.Get_size()}: launch with "
                           f"mpirun, or srun --mpi=pmix with an MPI that supports it")
    mpi = MPIComm()
    if backend_name == "numpy":
        return mpi
    # a rank failing here (no GPU for it, no NCCL) must not leave the others waiting for the unique id
    with abort_on_failure(mpi):
        return NCCLComm(mpi)


# ---- failure handling -------------------------------------------------------------------------------

def _report_and_abort(comm, exc_type, exc, tb, code: int):
    lines = traceback.format_exception(exc_type, exc, tb)
    prefix = f"[rank {comm.rank}/{comm.world_size}] "
    sys.stderr.write("".join(prefix + line for chunk in lines for line in chunk.splitlines(keepends=True)))
    sys.stderr.write(f"{prefix}aborting all ranks\n")
    comm.abort(code)


def install_abort_on_exception(comm) -> None:
    """An uncaught exception on any rank prints its traceback tagged with the rank, then aborts every
    rank (MPI_Abort) instead of leaving the others blocked in the next collective. World size 1 keeps
    Python's usual handling. SystemExit never reaches sys.excepthook: see abort_on_failure."""
    if comm.world_size == 1:
        return
    sys.excepthook = lambda exc_type, exc, tb: _report_and_abort(comm, exc_type, exc, tb, 1)


class Watchdog:
    """Aborts every rank when the caller makes no progress (no kick()) for `timeout` seconds. A rank that
    crashes already takes the job down; one that hangs (a dead GPU, a deadlock) would otherwise leave the
    others blocked in a collective forever, since neither MPI nor NCCL collectives time out by themselves."""

    def __init__(self, comm, timeout: float):
        self.comm, self.timeout = comm, timeout
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt2cu-watchdog", daemon=True)
        self._thread.start()

    def kick(self):
        self._last = time.monotonic()

    def stop(self):
        self._stopped.set()

    def _watch(self):
        while not self._stopped.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(f"[rank {self.comm.rank}/{self.comm.world_size}] no progress for {idle:.0f} s "
                                 f"(a rank may be hung inside a collective); aborting all ranks\n")
                self.comm.abort(1)


@contextlib.contextmanager
def abort_on_failure(comm):
    """Around code where one rank may exit alone: an exception or a non-zero sys.exit (argparse's
    error, for instance) inside the block aborts every rank with that exit code. Without it, Open MPI
    ranks that exit early wait in MPI_Finalize for the others, which wait in a collective: a hang."""
    try:
        yield
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 0 or comm.world_size == 1:
            raise
        if e.code is not None and not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
        sys.stderr.write(f"[rank {comm.rank}/{comm.world_size}] exiting with status {code}; aborting all ranks\n")
        comm.abort(code)
    except BaseException as e:
        if comm.world_size == 1:
            raise
        _report_and_abort(comm, type(e), e, e.__traceback__, 1)
