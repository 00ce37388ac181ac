"""Numerical agreement metrics (numpy only), used by validation and quantization reports."""

from __future__ import annotations

import numpy as np

# PSNR of identical arrays is infinite; reports cap it (and floor non-finite outputs) so JSON stays standard.
PSNR_CAP_DB = 200.0


def psnr(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """10 log10(peak^2 / MSE) in dB; `peak` defaults to the reference's largest magnitude."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {test.shape}")
    if not np.isfinite(test).all():
        return -PSNR_CAP_DB  # non-finite output: the worst score (JSON has no -inf)
    peak = float(np.abs(reference).max()) if peak is None else peak
    mse = float(np.mean((reference - test) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    if peak == 0.0:
        return -PSNR_CAP_DB
    return float(min(10.0 * np.log10(peak**2 / mse), PSNR_CAP_DB))


def compare(reference: np.ndarray, test: np.ndarray) -> dict:
    """PSNR (dB), max abs error, cosine similarity and whether the test array is finite everywhere."""
    r, t = np.asarray(reference, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    finite = bool(np.isfinite(t).all())
    denom = np.linalg.norm(r) * np.linalg.norm(t)
    return {
        "psnr_db": psnr(reference, test),
        "max_abs": float(np.abs(r - t).max()) if finite else None,
        "cosine": float(r @ t / denom) if finite and denom > 0 else 0.0,
        "finite": finite,
    }
