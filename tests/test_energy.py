"""gpt2cu.energy: the NVML meter bench/bench_train.py reports joules per step, power and clock with."""
from __future__ import annotations

import time

import pytest

from gpt2cu.energy import EnergyMeter


def test_meter_without_nvml_says_why():
    assert EnergyMeter.open("0000:00:00.0", library="libgpt2cu-no-such-nvml.so") is None
    assert "NVML not found" in EnergyMeter.why_not and "libgpt2cu-no-such-nvml.so" in EnergyMeter.why_not


@pytest.mark.gpu
def test_meter_over_busy_gpu(cuda_backend):
    import cupy as cp
    meter = EnergyMeter.open_cuda()
    if meter is None:
        pytest.skip(f"NVML's energy counter unavailable: {EnergyMeter.why_not}")
    with pytest.raises(RuntimeError, match="not started"):
        meter.stop()
    a = cp.random.standard_normal((4096, 4096), dtype=cp.float32)
    meter.start()
    with pytest.raises(RuntimeError, match="already started"):
        meter.start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:  # a second of GEMMs: the counter moves by far more than its resolution
        for _ in range(8):
            a = a @ a
            a /= cp.linalg.norm(a)
        cp.cuda.Device().synchronize()
    reading = meter.stop()
    assert 1.0 <= reading.seconds < 5.0
    # a busy datacenter GPU draws tens to hundreds of watts, under its limit plus the counter's slack
    assert reading.joules > 0 and 20.0 < reading.watts < 1.2 * reading.power_limit_w + 50.0
    assert 200.0 < reading.sm_mhz < 3500.0
