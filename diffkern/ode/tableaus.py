"""Butcher tableaus of the Runge-Kutta methods, all written first-same-as-last (FSAL): the embedded
pairs dopri5 and bosh3 (adaptive steps), and Euler, Heun and the classic fourth-order method on fixed
grids, each given one more stage at x_{n+1} (its a row is b, its weight 0) whose evaluation is the next
step's first, so Euler costs one model evaluation per step, Heun two and RK4 four. The fixed-grid
methods have no embedded error (all zero)."""
from __future__ import annotations

from typing import NamedTuple


class Tableau(NamedTuple):
    order: int        # order of the propagated solution; the embedded one is order - 1
    c: tuple          # stage times
    a: tuple          # a[i]: the coefficients of stage i (i >= 1) on k_0 .. k_{i-1}
    b: tuple          # the solution's weights (the last stage's a row: FSAL)
    error: tuple      # b - b_hat: the weights of the error estimate


TABLEAUS = {
    # Dormand & Prince (1980): the 5(4) pair of torchdiffeq's dopri5, scipy's RK45 and MATLAB's ode45
    "dopri5": Tableau(
        5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
         -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)),
    # Bogacki & Shampine (1989): the 3(2) pair of torchdiffeq's bosh3, scipy's RK23 and MATLAB's ode23
    "bosh3": Tableau(
        3, (0.0, 1 / 2, 3 / 4, 1.0),
        ((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8)),
    "euler": Tableau(1, (0.0, 1.0), ((), (1.0,)), (1.0, 0.0), (0.0, 0.0)),
    "heun": Tableau(2, (0.0, 1.0, 1.0), ((), (1.0,), (0.5, 0.5)), (0.5, 0.5, 0.0), (0.0, 0.0, 0.0)),
    # Kutta (1901), the RK4 of RNODE's training recipe
    "rk4": Tableau(
        4, (0.0, 0.5, 0.5, 1.0, 1.0),
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0)),
}
EMBEDDED_PAIRS = ("dopri5", "bosh3")  # the tableaus with an error estimate
