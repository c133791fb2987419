"""Helpers of the numpy op tests (test_numpy_ops.py, test_numpy_llama_ops.py): central finite differences,
NaN-filled outputs, and a closeness check scaled to the whole expected tensor. Their tolerances are argued
in test_numpy_ops.py's docstring."""
from __future__ import annotations

import numpy as np


def assert_close(actual, expected, rel):
    assert np.all(np.isfinite(actual)), "output not (fully) written"
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


def numeric_grad(f, x, h=1e-6):
    """d f() / d x by central differences, perturbing the contiguous array x in place."""
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def nans(*shape):
    return np.full(shape, np.nan)
