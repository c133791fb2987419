"""llm.c's outlier detector (llmc/outlier_detector.h): the z-score behind -sl and -sg."""
from __future__ import annotations

import math


class OutlierDetector:
    """z-score of each new value against a sliding window of the last `window` values (the new one
    included), as llm.c's outlier_detector.h: nan until the window is full, 0 when the window is flat.
    Sums are kept in float64 so the running += / -= does not drift."""

    def __init__(self, window: int = 128):
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.window = window
        self.buffer = [0.0] * window
        self.count = 0
        self.index = 0
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, x: float) -> float:
        x = float(x)
        if self.count < self.window:
            self.buffer[self.count] = x
            self.count += 1
            self.sum += x
            self.sum_sq += x * x
            return math.nan
        old = self.buffer[self.index]
        self.buffer[self.index] = x
        self.index = (self.index + 1) % self.window
        self.sum += x - old
        self.sum_sq += x * x - old * old
        mean = self.sum / self.window
        variance = self.sum_sq / self.window - mean * mean
        # rounding can leave a flat window with a tiny negative variance
        std = math.sqrt(variance) if variance > 0 else 0.0
        return (x - mean) / std if std > 0 else 0.0
