"""k-diffusion's linear multistep sampler: x_{i+1} = x_i + sum_j c_j d_{i-j}, the c_j the integrals over
[sigma_i, sigma_{i+1}] of the Lagrange basis polynomials on the last ``order`` noise levels.

k-diffusion integrates them numerically (scipy's quad); the integrands are polynomials of degree
order - 1, so here they are integrated exactly (in closed form, term by term), which is what quad's
Gauss-Kronrod rule returns for them to rounding. One fused launch per step writes x_{i+1} and the step's
derivative d_i = (x_i - D_i) / sigma_i, the only history kept.
"""
from __future__ import annotations

import torch

from .. import coefficients
from .._validate import check_positive_int
from ._run import RowBook, Run, check_sigmas, check_x


def linear_multistep_coeff(order, t, i, j) -> float:
    """The weight of d_{i-j} in the order-``order`` step from t[i] to t[i + 1]: the integral of the
    Lagrange polynomial that is 1 at t[i - j] and 0 at the other t[i - k], k < order."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    nodes = [float(t[i - k]) for k in range(order)]
    poly = [1.0]  # coefficients, lowest power first
    for k, node in enumerate(nodes):
        if k == j:
            continue
        scale = 1.0 / (nodes[j] - node)
        shifted = [0.0] + [c * scale for c in poly]  # tau * poly
        for power, c in enumerate(poly):
            shifted[power] -= node * scale * c
        poly = shifted
    a, b = float(t[i]), float(t[i + 1])
    return sum(c * (b ** (p + 1) - a ** (p + 1)) / (p + 1) for p, c in enumerate(poly))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep sampling (the order rises to ``order`` as derivatives accumulate), as
    k-diffusion's ``sample_lms``: one model call and one fused launch per step."""
    x, given, sigmas = check_x(x), sigmas, check_sigmas(sigmas, x.device)
    order = check_positive_int("order", order)
    run = Run(model, x, sigmas, extra_args, callback, disable, given=given)
    n = len(run.values) - 1
    rows, plan = run.plan(_lms_plan, order)
    run.tables(rows)
    history = []  # d_{i-1}, d_{i-2}, ... newest first
    for i in run.steps(n):
        denoised = run.denoise(x, sigmas[i] * run.s_in)
        run.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        kind, index = plan[i]
        k = int(kind[3:])
        x, d = run.launch([x, denoised] + history[:k - 1], kind, index, outputs=2)
        history = [d] + history[:order - 2]
    return x


def _lms_plan(levels: torch.Tensor, values: list, order: int):
    """Every step's row (the weights of [x, D, d_{i-1}, ..]; outputs x_{i+1} and d_i) and its table."""
    book, plan = RowBook(), []
    for i in range(len(values) - 1):
        k = min(i + 1, order)
        c = [linear_multistep_coeff(k, values, i, j) for j in range(k)]
        sigma = float(values[i])
        outputs = [(0.0, [1 + c[0] / sigma, -c[0] / sigma] + c[1:], 0.0),
                   (0.0, [1 / sigma, -1 / sigma] + [0.0] * (k - 1), 0.0)]
        plan.append((f"lms{k}", book.add(f"lms{k}", coefficients.linear_row([0.0] * (k + 1), outputs))))
    return book.rows, plan
