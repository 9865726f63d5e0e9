"""Tolerances derived from floating-point error bounds, never from what one machine printed.

Every tolerance of the numeric tests is ``c · u(dtype) · scale`` (or the square root of such a
bound where a formula cancels), with ``scale`` taken from the test's own inputs and ``c`` counted
from the formula. The bounds are worst-case bounds, valid for every summation order, so for any
BLAS kernel, SIMD width (SSE, AVX2, AVX-512), thread count or library version; a test passes or
fails for the same reason on every machine.

Notation and results (N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
SIAM 2002, cited by section):

* ``u(dtype)``, the unit roundoff (half the machine epsilon): 2^-53 for float64, 2^-24 for
  float32, 2^-8 for bfloat16, 2^-11 for float16. A basic operation (+ - × / sqrt) returns the
  exact result times ``(1 + θ)``, ``|θ| <= u`` (§2.2); rounding a value to a dtype likewise.
* ``gamma(n) = n u / (1 - n u)``: a sum of n terms or a dot product of length n, in any order, has
  ``|fl(Σ x_i y_i) - Σ x_i y_i| <= γ_n Σ |x_i y_i|`` (§3.1, eq. 3.5), and a chain of n rounded
  operations on one value has relative error <= γ_n (Lemma 3.1).
* Transcendental functions (exp, log, log1p, pow): relative error <= ``FUNCTION_ULPS`` units in
  the last place, one ulp being at most ``2u`` relative.
* Householder QR of a d × m matrix (§19.3, Thm 19.4 and eq. 19.13): the computed Q is within
  ``sqrt(m) · γ̃_{dm}`` (Frobenius) of an exactly orthonormal basis of a matrix within
  ``γ̃_{dm}`` (columnwise, relative) of the input; ``γ̃_k = c k u/(1 - c k u)`` with "a small
  integer constant" c, taken as ``QR_C``.
* Symmetric eigensolvers (LAPACK Users' Guide §4.7; Householder tridiagonalisation, §19.3):
  the computed eigenpairs are exact for ``A + E`` with ``‖E‖₂ <= p(n) u ‖A‖₂``; we take
  ``p(n) = sqrt(n) · QR_C · n²`` (n - 2 reflections of length n). An invariant subspace moves by
  ``sin Θ <= ‖E‖ / gap`` (Davis-Kahan), a singular subspace of ``Y + ΔY`` by
  ``sin Θ <= ‖ΔY‖ / gap`` (Wedin), with gap the distance to the rest of the spectrum.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

# glibc, SLEEF (torch's vectorised CPU kernels), numpy's SIMD loops, MKL VML and CUDA's libdevice
# document at most 1 ulp for exp/log/log1p in float64 and at most 4 ulp for any of these
# functions in any precision (CUDA's powf); we allow the largest of these everywhere.
FUNCTION_ULPS = 4
# The "small integer constant" of Higham's γ̃ for Householder QR and tridiagonalisation.
QR_C = 4


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, torch.Tensor):
        return dtype.dtype
    if isinstance(dtype, np.ndarray):
        dtype = dtype.dtype
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def u(dtype: Any = torch.float64) -> float:
    """Unit roundoff of a torch/numpy dtype (or of a tensor's/array's dtype)."""
    return torch.finfo(_torch_dtype(dtype)).eps / 2


def gamma(n: float, dtype: Any = torch.float64) -> float:
    """Higham's γ_n = n u / (1 - n u): error factor of a sum / dot product of n terms."""
    nu = n * u(dtype)
    assert nu < 0.5, f"gamma({n}) is not small for {dtype}: the bound would be meaningless"
    return nu / (1.0 - nu)


def function_error(dtype: Any = torch.float64) -> float:
    """Relative error bound of one transcendental function evaluation (FUNCTION_ULPS ulp)."""
    return FUNCTION_ULPS * 2.0 * u(dtype)


def distance_error(d: int, dtype: Any = torch.float64) -> float:
    """Relative error of ``‖a - b‖`` from explicit differences (``cdist`` without matrix
    products, ``np.linalg.norm(a - b)``): d rounded differences and squares, a sum of d terms and
    a square root, a chain of at most d + 3 operations: <= γ_{d+3}."""
    return gamma(d + 3, dtype)


def gram_distance_error(d: int, dtype: Any, norms_a: Any, norms_b: Any) -> np.ndarray:
    """Absolute error of ``‖a‖² + ‖b‖² - 2 a·b`` (the matrix-product route to squared distances):
    three length-d dot products and two additions, ``<= γ_{d+2} (‖a‖ + ‖b‖)²`` (pairwise, outer)."""
    a, b = np.asarray(norms_a, dtype=np.float64), np.asarray(norms_b, dtype=np.float64)
    return gamma(d + 2, dtype) * (a[:, None] + b[None, :]) ** 2


def qr_orthonormality(d: int, m: int, dtype: Any = torch.float64) -> float:
    """Bound on ``|(QᵀQ - I)_kl|`` for a Householder-QR basis of a d × m matrix:
    ``2 sqrt(m) γ̃_{dm}`` (twice the distance to an orthonormal matrix, Higham eq. 19.13)."""
    return 2.0 * math.sqrt(m) * gamma(QR_C * d * m, dtype)


def eigh_backward(n: int, dtype: Any = torch.float64) -> float:
    """Relative backward error ``‖E‖₂ / ‖A‖₂`` of a symmetric n × n eigensolver: p(n) u."""
    return math.sqrt(n) * gamma(QR_C * n * n, dtype)


def pearson_error(x: Any, y: Any, dtype: Any = torch.float64) -> float:
    """Absolute error bound of a Pearson correlation of N pairs computed in ``dtype``.

    Centering: the means carry ``γ_{N+1} max|x|``, so every centred value does too (plus u).
    The three sums of N products carry γ_N relative to their absolute sums, which Cauchy-Schwarz
    bounds by ``‖x_c‖ ‖y_c‖`` (and ``‖x_c‖²``, ``‖y_c‖²``); the square root and the division add
    3u. A centred vector perturbed by ``e`` moves r by at most ``2 ‖e‖ / ‖x_c‖``. So
    ``|δr| <= 2 γ_{N+2} sqrt(N) (max|x| / ‖x_c‖ + max|y| / ‖y_c‖) + 3 γ_N + 3u``.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    xc, yc = np.linalg.norm(x - x.mean()), np.linalg.norm(y - y.mean())
    centring = 2.0 * gamma(n + 2, dtype) * math.sqrt(n) * (np.abs(x).max() / xc + np.abs(y).max() / yc)
    return float(centring + 3.0 * gamma(n, dtype) + 3.0 * u(dtype))


def stml_similarity_error(t_emb: Any, sigma: float, topk: int) -> np.ndarray:
    """Bound (n, n) on ``|W - W_exact|`` for STML's similarity (``plmetric.evaluation.estimators.stml_similarity``
    or a loop port of the authors' code) of the embeddings ``t_emb``.

    ``W_P = exp(-‖t_i - t_j‖² / σ)`` on unit rows ``t``: the rows are off by γ_{d+3}
    (normalisation), so ``‖t_i - t_j‖²`` by ``4 · 2γ_{d+3}`` (its gradient is <= 2‖t_i - t_j‖ <= 4)
    plus ``γ_{d+2} (‖t_i‖ + ‖t_j‖)² = 4γ_{d+2}`` for the matrix-product route; then ``/σ`` and exp:
    ``W_P (δ/σ + f + 2u)``. ``W_C``: the 0/1 neighbour indicators and their counts are exact
    integers, one division (u), a mean of ``q = round(topk/2)`` rows (γ_q) and a half-sum (u),
    on values <= 1: ``γ_{q+2}``. ``W = ½(W_P + W_C)``: u. Valid where the neighbour sets are
    the exact ones (:func:`assert_stable_topk`).
    """
    t = np.asarray(t_emb, dtype=np.float64)
    d = t.shape[1]
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    w_p = np.exp(-((t[:, None] - t[None]) ** 2).sum(-1) / sigma)
    delta_d2 = 8 * gamma(d + 3) + 4 * gamma(d + 2)
    dw_p = w_p * (delta_d2 / sigma + function_error() + 2 * u())
    q = max(1, int(np.around(topk / 2)))
    return 0.5 * (dw_p + gamma(q + 2)) + u()


def assert_stable_topk(t_emb: Any, sigma: float, topk: int) -> None:
    """STML's topk neighbour sets are the exact ones: in every row the topk-th and the next
    ``W_P`` differ by more than the error bounds of both implementations (4 × the largest
    ``W_P`` error of :func:`stml_similarity_error`), so no rounding can swap them."""
    t = np.asarray(t_emb, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    w_p = np.exp(-((t[:, None] - t[None]) ** 2).sum(-1) / sigma)
    np.fill_diagonal(w_p, np.inf)  # the point itself ranks first
    ranked = -np.sort(-w_p, axis=1)
    err = 2 * stml_similarity_error(t_emb, sigma, topk).max()  # W_P's part of W's error, ×2
    gaps = ranked[:, topk - 1] - ranked[:, topk] if topk < len(t) else np.full(len(t), np.inf)
    assert (gaps > 2 * err).all(), "a neighbour rank lies within the rounding error"


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def assert_within(actual: Any, desired: Any, bound: Any, what: str = "") -> None:
    """Assert ``|actual - desired| <= bound`` elementwise (bound broadcasts; arrays or tensors)."""
    a, d, b = _as_array(actual), _as_array(desired), _as_array(bound)
    assert a.shape == d.shape, f"{what}: shapes {a.shape} and {d.shape} differ"
    assert np.isfinite(b).all() and (b >= 0).all(), f"{what}: the bound must be finite and >= 0"
    error = np.abs(a - d)
    bad = ~(error <= b)  # NaN counts as a violation
    if bad.any():
        worst = np.unravel_index(
            np.argmax(np.where(bad, error - np.broadcast_to(b, error.shape), -np.inf)), error.shape
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {error.size} values outside the error bound; worst at {worst}: "
            f"|{a[worst]!r} - {d[worst]!r}| = {error[worst]:.3e} > {np.broadcast_to(b, error.shape)[worst]:.3e}"
        )


def assert_rejects(actual: Any, desired: Any, bound: Any, what: str = "") -> None:
    """The check :func:`assert_within` must fail for a deliberately wrong ``actual``."""
    try:
        assert_within(actual, desired, bound, what)
    except AssertionError:
        return
    raise AssertionError(f"{what}: the error bound is too loose to reject a perturbed result")


# ------------------------------------------------------------------------------------------
# `make test-codepaths`: do the code-path environment variables take effect?
# ------------------------------------------------------------------------------------------


def check_codepaths() -> list[str]:
    """Check, where it can be read back, that the environment of ``make test-codepaths`` selects
    the other code paths; raise ``SystemExit`` naming any that did not take effect. Returns the
    report lines (also printed)."""
    import os

    report, failed = [], []

    def expect(name: str, ok: bool, detail: str) -> None:
        report.append(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)

    if "ATEN_CPU_CAPABILITY" in os.environ:
        capability = torch.backends.cpu.get_cpu_capability()
        expect("ATEN_CPU_CAPABILITY", capability == os.environ["ATEN_CPU_CAPABILITY"].upper(), capability)
    if "OMP_NUM_THREADS" in os.environ:
        threads = torch.get_num_threads()
        expect("OMP_NUM_THREADS", threads == int(os.environ["OMP_NUM_THREADS"]), f"torch uses {threads} thread(s)")
    try:
        import threadpoolctl
    except ImportError:
        report.append("skip threadpoolctl not installed: BLAS thread counts and OpenBLAS kernels unchecked")
    else:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS too)

        with contextlib.suppress(ImportError):
            import faiss  # noqa: F401  (its own OpenBLAS and OpenMP)
        for pool in threadpoolctl.threadpool_info():
            name = f"{pool['internal_api']} ({os.path.basename(pool['filepath'])})"
            variable = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS", "openmp": "OMP_NUM_THREADS"}
            wanted = os.environ.get(variable.get(pool["internal_api"], ""))
            if wanted is not None:
                expect(f"{name} threads", pool["num_threads"] == int(wanted), str(pool["num_threads"]))
            if pool["internal_api"] == "openblas" and "OPENBLAS_CORETYPE" in os.environ:
                arch = str(pool.get("architecture"))
                expect(f"{name} OPENBLAS_CORETYPE", arch.lower() == os.environ["OPENBLAS_CORETYPE"].lower(), arch)
    if os.environ.get("NPY_DISABLE_CPU_FEATURES"):
        core = getattr(np, "_core", None) or np.core
        features = core._multiarray_umath.__cpu_features__
        disabled = os.environ["NPY_DISABLE_CPU_FEATURES"].replace(",", " ").split()
        still_on = [f for f in disabled if features.get(f)]
        expect(
            "NPY_DISABLE_CPU_FEATURES",
            not still_on,
            f"off: {disabled}" + (f", still on: {still_on}" if still_on else ""),
        )
    if "FAISS_SIMD_LEVEL" in os.environ:
        try:
            import faiss
        except ImportError:
            report.append("skip faiss not installed")
        else:
            config = getattr(faiss, "SIMDConfig", None)
            if config is None or not hasattr(config, "get_level_name"):
                report.append("skip FAISS_SIMD_LEVEL: this faiss has no SIMDConfig to read back")
            else:
                level = config.get_level_name()
                expect("FAISS_SIMD_LEVEL", level == os.environ["FAISS_SIMD_LEVEL"], level)
    if "MKL_ENABLE_INSTRUCTIONS" in os.environ:
        report.append("note MKL_ENABLE_INSTRUCTIONS: set; MKL offers no way to read it back (MKL_VERBOSE=1 shows NThr)")
    print("\n".join(report))
    if failed:
        raise SystemExit(f"code-path settings without effect: {', '.join(failed)}")
    return report


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--check-codepaths"]:
        raise SystemExit("usage: python tests/numerics.py --check-codepaths")
    check_codepaths()
