"""CPU model of one CTA of attention_sm90.cu's fused backward: its synchronization only (mbarriers, named barriers,
wgmma waits), under random interleavings.

    python3 dev/attn_sm90/sim_bwd_sync.py [--seeds 3000]

Agents: the TMA producer (Q/dO tile i into stage i % 2 once stage i - 2 is released; the lse/D warp waits alike),
the two consumer warpgroups (steps in the kernel's order), the dQ adder thread (reads a staging buffer
once both warpgroups filled it, frees it once read). A product reads its shared-memory operands at some time
between its issue and the wait that retires it: each read is an open interval, and every write checks that no
other agent's interval on that buffer is open. A step that waits blocks until its condition holds; no runnable
agent while some are unfinished is a deadlock. Every check is an assert.
"""
import argparse
import random

STAGES, DQBUFS = 2, 2


class Cta:
    def __init__(self, n_tiles, subtiles, rng):
        self.n, self.sub, self.rng = n_tiles, subtiles, rng
        self.stage = [None] * STAGES          # tile held by each Q/dO/aux stage
        self.full = [0] * STAGES              # completed phases of q_full (= do_full = aux_full)
        self.empty = [0] * STAGES             # arrivals on empty (both warpgroups: 2 a phase)
        self.ds = [None, None]                # dS^T halves (warpgroup w's keys) in shared memory
        self.staging = [[None, None] for _ in range(DQBUFS)]
        self.dq_full = [0] * DQBUFS
        self.dq_empty = [0] * DQBUFS
        self.bar = {1: [0, 0], 2: [0, 0]}     # arrivals per warpgroup on named barriers 1, 2
        self.reads = []                       # open reads: (agent, buffer name)
        self.added = []

    def write(self, who, buf):
        assert not any(b == buf and a != who for a, b in self.reads), f"{who} writes {buf} under a read"

    def producer(self):
        for i in range(self.n):
            st = i % STAGES
            if i >= STAGES:
                yield lambda st=st, i=i: self.empty[st] >= 2 * (i // STAGES)
            self.write("producer", ("stage", st))
            self.stage[st] = i
            self.full[st] += 1
            yield None

    def consumer(self, w):
        me = f"wg{w}"
        pending = []  # products issued and not yet retired: (name, [buffers read], check)

        def issue(name, bufs, check):
            assert check(), f"{me} {name}: wrong operands at issue"
            self.reads.extend((me, b) for b in bufs)
            pending.append((name, bufs, check))

        def wait(n_left):
            while len(pending) > n_left:
                name, bufs, check = pending.pop(0)
                assert check(), f"{me} {name}: operands changed before retirement"
                for b in bufs:
                    self.reads.remove((me, b))

        def barrier(k):
            self.bar[k][w] += 1
            gen = self.bar[k][w]
            yield lambda: min(self.bar[k]) >= gen

        def wait_tile(i):
            st = i % STAGES
            yield lambda: self.full[st] >= i // STAGES + 1
            assert self.stage[st] == i

        def s_dp(i, hh):
            st = i % STAGES
            issue(f"S,dP {i}.{hh}", [("stage", st)], lambda: self.stage[st] == i)

        for i in range(self.n):
            st = i % STAGES
            yield from wait_tile(i)
            s_dp(i, 0)
            for hh in range(self.sub):
                wait(1)  # S^T
                yield None
                issue(f"dV {i}.{hh}", [("stage", st)], lambda: self.stage[st] == i)
                wait(1)  # dP^T
                yield None
                issue(f"dK {i}.{hh}", [("stage", st)], lambda: self.stage[st] == i)
                if hh + 1 < self.sub:
                    s_dp(i, hh + 1)
                if hh == 0:
                    yield from barrier(1)
                self.write(me, ("ds", w))
                self.ds[w] = i
                yield None
            yield from barrier(2)
            issue(f"dQ {i}", [("ds", 0), ("ds", 1)], lambda: self.ds == [i, i])
            wait(0)
            self.empty[st] += 1
            buf = i % DQBUFS
            if i >= DQBUFS:
                yield lambda: self.dq_empty[buf] >= i // DQBUFS
            self.write(me, ("staging", buf))
            self.staging[buf][w] = i
            self.dq_full[buf] += 1
            yield None
        wait(0)

    def adder(self):
        for d in range(self.n):
            buf = d % DQBUFS
            yield lambda: self.dq_full[buf] >= 2 * (d // DQBUFS + 1)
            self.reads.append(("adder", ("staging", buf)))
            yield None
            assert self.staging[buf] == [d, d], f"adder: staging {buf} holds {self.staging[buf]}, tile {d}"
            self.reads.remove(("adder", ("staging", buf)))  # cp.async.bulk.wait_group.read
            self.dq_empty[buf] += 1
            self.added.append(d)
            yield None

    def run(self):
        agents = {"producer": self.producer(), "wg0": self.consumer(0), "wg1": self.consumer(1),
                  "adder": self.adder()}
        conds = {k: None for k in agents}
        while agents:
            ready = [k for k in agents if conds[k] is None or conds[k]()]
            assert ready, f"deadlock: {sorted(agents)} blocked"
            k = self.rng.choice(ready)
            try:
                conds[k] = next(agents[k])
            except StopIteration:
                del agents[k]
        assert self.added == list(range(self.n))
        assert not self.reads


ap = argparse.ArgumentParser()
ap.add_argument("--seeds", type=int, default=3000)
args = ap.parse_args()
runs = 0
for sub in (1, 2):  # sub-tiles per tile: HS 128 (1), HS 64 (2)
    for n in (1, 2, 3, 5, 8):
        for seed in range(args.seeds // 10):
            Cta(n, sub, random.Random(seed * 131 + n)).run()
            runs += 1
print(f"ok: {runs} random interleavings, 1 or 2 sub-tiles, 1 .. 8 tiles")
