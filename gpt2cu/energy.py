"""A GPU's energy, power and SM clock over a window of work, from NVML (the driver's library, through ctypes: no
package to install).

Why: on an H100 or H200 a training step of GPT-2 runs at the board's power limit (700 W), so the clock, and with
it a kernel's speed, depends on the energy everything around it uses. Two programs compared at the limit differ in
joules per step as much as in milliseconds; bench/bench_train.py reports both from the same run.

    meter = EnergyMeter.open(pci_bus_id)    # None, with EnergyMeter.why_not set, where NVML is unavailable
                                            # (EnergyMeter.open_cuda(): the current CUDA device's)
    meter.start(); ...work...; reading = meter.stop()
    reading.joules, reading.watts, reading.sm_mhz

The energy is the driver's counter (millijoules since it loaded; Volta and later) read at both ends of the window;
the clock is the mean of samples taken every `sample_s` by a thread while the window is open.
"""
from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

NVML_LIBRARY = "libnvidia-ml.so.1"
_NVML_CLOCK_SM = 1
_NVML_SUCCESS = 0


@dataclass
class EnergyReading:
    joules: float
    seconds: float
    sm_mhz: float  # mean of the samples (nan if the window was too short for one)
    power_limit_w: float

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")


class EnergyMeter:
    why_not = ""  # set by open() when it returns None

    def __init__(self, lib, handle, sample_s: float):
        self._lib, self._handle, self._sample_s = lib, handle, sample_s
        self._thread = None

    @classmethod
    def open(cls, pci_bus_id: str, sample_s: float = 0.02, library: str = NVML_LIBRARY) -> "EnergyMeter | None":
        """The meter of the GPU at pci_bus_id ("0000:3B:00.0", as cudaDeviceGetPCIBusId gives it), or None where
        NVML, that GPU or its energy counter is unavailable (EnergyMeter.why_not says which)."""
        try:
            lib = ctypes.CDLL(library)
        except OSError as e:
            cls.why_not = f"NVML not found ({library}: {e})"
            return None
        lib.nvmlErrorString.restype = ctypes.c_char_p
        handle = ctypes.c_void_p()
        for call, args in (("nvmlInit_v2", ()),
                           ("nvmlDeviceGetHandleByPciBusId_v2", (pci_bus_id.encode(), ctypes.byref(handle)))):
            rc = getattr(lib, call)(*args)
            if rc != _NVML_SUCCESS:
                cls.why_not = f"{call} failed: {lib.nvmlErrorString(rc).decode()}"
                return None
        meter = cls(lib, handle, sample_s)
        try:
            meter._energy_mj()
        except RuntimeError as e:
            cls.why_not = str(e)
            return None
        return meter

    @classmethod
    def open_cuda(cls, device: int | None = None, sample_s: float = 0.02) -> "EnergyMeter | None":
        """The meter of CUDA device `device` (the current one if None), found by its PCI bus id through CuPy."""
        import cupy as cp
        index = cp.cuda.Device().id if device is None else device
        return cls.open(cp.cuda.runtime.deviceGetPCIBusId(index), sample_s)

    def _query(self, call, *args, ctype=ctypes.c_uint):
        value = ctype()
        rc = getattr(self._lib, call)(self._handle, *args, ctypes.byref(value))
        if rc != _NVML_SUCCESS:
            raise RuntimeError(f"{call} failed: {self._lib.nvmlErrorString(rc).decode()}")
        return value.value

    def _energy_mj(self) -> int:
        return self._query("nvmlDeviceGetTotalEnergyConsumption", ctype=ctypes.c_ulonglong)

    def sm_mhz(self) -> int:
        return self._query("nvmlDeviceGetClockInfo", ctypes.c_int(_NVML_CLOCK_SM))

    def power_limit_w(self) -> float:
        return self._query("nvmlDeviceGetEnforcedPowerLimit") / 1e3

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EnergyMeter.start: already started")
        self._samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0, self._e0 = time.perf_counter(), self._energy_mj()
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._sample_s):
            self._samples.append(self.sm_mhz())

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise RuntimeError("EnergyMeter.stop: not started")
        e1, t1 = self._energy_mj(), time.perf_counter()
        self._stop.set()
        self._thread.join()
        self._thread = None
        mhz = sum(self._samples) / len(self._samples) if self._samples else float("nan")
        return EnergyReading(joules=(e1 - self._e0) / 1e3, seconds=t1 - self._t0, sm_mhz=mhz,
                             power_limit_w=self.power_limit_w())
