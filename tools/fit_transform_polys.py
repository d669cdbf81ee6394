"""Fit the polynomial coefficients used by csrc/include/diffkern/normal.h.

The Box-Muller transform needs log(u) on (0, 1] and sin/cos of an angle given in turns. The
kernels evaluate them with fixed float32 polynomials (explicit fma, no library calls) so that the
CPU scalar path, the CPU SIMD path and the CUDA path produce bitwise-identical normals. This script
is how the coefficients were obtained: a weighted least-squares fit on Chebyshev nodes in float64
(close to minimax for these smooth functions), then rounding to float32. Re-run it to check them:

    python tools/fit_transform_polys.py
"""
import numpy as np


def cheb_nodes(a, b, n):
    k = np.arange(n)
    return 0.5 * (a + b) + 0.5 * (b - a) * np.cos(np.pi * (k + 0.5) / n)


def fit(x, y, powers, weight):
    A = np.stack([x**p for p in powers], axis=1) * weight[:, None]
    coef, *_ = np.linalg.lstsq(A, y * weight, rcond=None)
    return coef


def main():
    # log(1 + f) = f + f^2 * L(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]; fit L (degree 8) so the
    # relative error of log(1 + f) is small.
    a, b = np.sqrt(0.5) - 1, np.sqrt(2.0) - 1
    f = cheb_nodes(a, b, 4000)
    target = (np.log1p(f) - f) / f**2
    powers = list(range(9))
    w = f**2 / np.abs(np.log1p(f))  # relative error in log(1+f)
    L = fit(f, target, powers, w).astype(np.float32)
    g = np.linspace(a, b, 200001)
    approx = g + g**2 * np.polyval(L[::-1].astype(np.float64), g)
    rel = np.abs(approx - np.log1p(g)) / np.maximum(np.abs(np.log1p(g)), 1e-300)
    print("log1p L coefficients (f^0..f^8):")
    print(",\n".join(f"    {c!r}f" for c in L.tolist()))
    print("max rel err (float64 eval):", rel[np.abs(g) > 1e-12].max())

    # sin(2 pi f) = f * S(f^2), cos(2 pi f) = C(f^2) on f in [-1/8, 1/8] (f in turns).
    f = cheb_nodes(0, 0.125, 4000)
    S = fit(f**2, np.sin(2 * np.pi * f) / f, range(5), f / np.sin(2 * np.pi * f)).astype(np.float32)
    C = fit(f**2, np.cos(2 * np.pi * f), range(5), 1 / np.cos(2 * np.pi * f)).astype(np.float32)
    g = np.linspace(1e-9, 0.125, 200001)
    s = g * np.polyval(S[::-1].astype(np.float64), g**2)
    c = np.polyval(C[::-1].astype(np.float64), g**2)
    print("sin S coefficients:", ", ".join(f"{v!r}f" for v in S.tolist()))
    print("cos C coefficients:", ", ".join(f"{v!r}f" for v in C.tolist()))
    print("sin max rel err:", (np.abs(s - np.sin(2 * np.pi * g)) / np.sin(2 * np.pi * g)).max())
    print("cos max rel err:", (np.abs(c - np.cos(2 * np.pi * g)) / np.cos(2 * np.pi * g)).max())


if __name__ == "__main__":
    main()
