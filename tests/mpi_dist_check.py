"""Run under mpirun by tests/test_dist.py: checks MPIComm's collectives on every rank and exits non-zero
(taking the other ranks down through install_abort_on_exception) when one is wrong.

  mpirun -np N python tests/mpi_dist_check.py          the collectives
  mpirun -np N python tests/mpi_dist_check.py raise    rank 1 raises while the others wait in a barrier
  mpirun -np N python tests/mpi_dist_check.py exit     rank 1 calls sys.exit(3) inside abort_on_failure
  mpirun -np N python tests/mpi_dist_check.py hang     rank 1 stops making progress; the others' Watchdog fires

Every rank can regenerate every other rank's data (seeded by rank), so each computes the expected
result locally. Tolerances: a float32 sum of N <= 8 values of magnitude ~1 differs between summation
orders by a few ulps of the total, so 1e-6 relative plus 1e-6 absolute (values ~1, sums ~N).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2cu.dist import (MPIComm, Watchdog, abort_on_failure, init_distributed,  # noqa: E402
                         install_abort_on_exception)

RTOL = ATOL = 1e-6


def data(rank: int, n: int, salt: int) -> np.ndarray:
    return np.random.default_rng(1000 * salt + rank).normal(size=n).astype(np.float32)


def check_collectives(comm):
    world, rank = comm.world_size, comm.rank
    assert isinstance(comm, MPIComm), type(comm)
    assert world == int(os.environ["OMPI_COMM_WORLD_SIZE"]) and rank == int(os.environ["OMPI_COMM_WORLD_RANK"])
    assert 0 <= comm.local_rank < world  # one node: local ranks are the ranks

    shard = 1000 + 3  # odd on purpose
    n = shard * world
    everyone = [data(r, n, 1) for r in range(world)]
    total = np.sum(np.stack(everyone).astype(np.float64), axis=0)

    buf = everyone[rank].copy()
    comm.all_reduce(buf, "sum")
    np.testing.assert_allclose(buf, total, rtol=RTOL, atol=ATOL)
    reduced = buf

    buf = everyone[rank].copy()
    comm.all_reduce(buf, "avg")
    assert buf.dtype == np.float32
    np.testing.assert_allclose(buf, total / world, rtol=RTOL, atol=ATOL)

    # reduce-scatter then all-gather is an all-reduce
    recv = np.empty(shard, np.float32)
    comm.reduce_scatter(everyone[rank].copy(), recv, "sum")
    np.testing.assert_allclose(recv, total[rank * shard:(rank + 1) * shard], rtol=RTOL, atol=ATOL)
    gathered = np.empty(n, np.float32)
    comm.all_gather(recv, gathered)
    np.testing.assert_allclose(gathered, reduced, rtol=RTOL, atol=ATOL)

    # started (ZeRO-3's layer prefetch): the same gather once finish() returns
    gathered_later = np.empty(n, np.float32)
    comm.finish([comm.all_gather_start(recv, gathered_later)])
    np.testing.assert_array_equal(gathered_later, gathered)

    # ZeRO-1's in-place pattern: gradients reduced into this rank's slot, parameters gathered from it
    grads = everyone[rank].copy()
    mine = grads[rank * shard:(rank + 1) * shard]
    comm.reduce_scatter(grads, mine, "avg")
    np.testing.assert_allclose(mine, total[rank * shard:(rank + 1) * shard] / world, rtol=RTOL, atol=ATOL)
    params = np.full(n, np.nan, np.float32)
    params[rank * shard:(rank + 1) * shard] = rank
    comm.all_gather(params[rank * shard:(rank + 1) * shard], params)
    np.testing.assert_array_equal(params, np.repeat(np.arange(world, dtype=np.float32), shard))

    for root in (0, world - 1):
        buf = data(rank, 257, 2)
        comm.broadcast(buf, root=root)
        np.testing.assert_array_equal(buf, data(root, 257, 2))

    assert comm.all_reduce_scalar(0.5 * (rank + 1)) == 0.25 * world * (world + 1)  # exact in binary
    comm.barrier()


def main(mode: str):
    comm = init_distributed("numpy")
    install_abort_on_exception(comm)
    if mode == "check":
        check_collectives(comm)
        if comm.rank == 0:
            print(f"mpi_dist_check: all collectives OK on {comm.world_size} ranks")
    elif mode == "raise":
        if comm.rank == 1:
            raise RuntimeError("deliberate failure on rank 1")
        comm.barrier()  # would wait forever for rank 1
    elif mode == "exit":
        with abort_on_failure(comm):
            if comm.rank == 1:
                sys.exit(3)
            comm.barrier()
    elif mode == "hang":
        watchdog = Watchdog(comm, timeout=1.0)
        if comm.rank == 1:
            time.sleep(3600)  # a hung rank: no exception, no exit
        comm.barrier()  # the others wait here until the watchdog aborts the job
        watchdog.stop()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "check")
