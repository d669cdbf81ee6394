"""Poisson flow generative models (seed 002, section 5): the backward ODE in augmented space.

The data x (N features per sample) are charges on the plane z = 0 of the augmented space
x~ = (x, z) in R^{N+1}. Their field (eq. 97; eq. 98 for a finite set, ``dk.models.EmpiricalPoissonField``)
or a network trained on its normalised form v = -sqrt(N) E / |E| (eq. 99) drives the backward ODE with
z as the time variable (eq. 101):

    dx/dz = E_x / E_z        (= v_x / v_z: only the ratio matters, so E or v, at any positive scale)

from the plane z = z_max, where the samples start from the prior below, down to z = z_min ~ 0.

Time variable. ``time="log_z"`` (the default) steps evenly in tau = log z, where the ODE reads
dx/dtau = z E_x / E_z: the field's structure lives on the scale z itself (far from the data it is a
point charge's, near the plane it resolves single data points), so even steps in log z spend equal
effort per scale, as PFGM's code does (its ODE and RK45 samplers integrate in t = log z); even
steps in z (``time="z"``) spend almost all of them far from the data. Each step is one launch of
the fused step with a per-sample coefficient (step size) / E_z computed on the device from the
field's output: no host synchronisation per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .. import coefficients, ops
from .._graph import compiling, plan
from .._model import StepInfo, step_callback
from .._model import progress as progress_bar
from .._validate import check_choice, check_dtype, check_positive, check_positive_int, check_shape
from ..noise import randn, resolve_device

SOLVERS = ("euler", "heun")
TIMES = ("z", "log_z")


@dataclass(frozen=True)
class _Path:
    """The ODE's path: num_steps of ``solver`` from z_start to z_end, even in ``time`` (z or log z)."""

    z_start: float
    z_end: float
    num_steps: int
    solver: str
    time: str

    @classmethod
    def checked(cls, z_levels: tuple, num_steps, solver, time) -> "_Path":
        """From (z_min, z_max) as the user gave them; the caller orders start and end."""
        z_min, z_max = check_positive("z_min", z_levels[0]), check_positive("z_max", z_levels[1])
        if z_min >= z_max:
            raise ValueError(f"z_min must be smaller than z_max, got z_min={z_min} and z_max={z_max}")
        return cls(z_min, z_max, check_positive_int("num_steps", num_steps), check_choice("solver", solver, SOLVERS),
                   check_choice("time", time, TIMES))

    def reversed(self) -> "_Path":
        return _Path(self.z_end, self.z_start, self.num_steps, self.solver, self.time)


def pfgm_prior(shape, z_max: float = 40.0, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
               sample_offset: int = 0, max_radius: Optional[float] = None) -> torch.Tensor:
    """Samples of PFGM's prior on the plane z = z_max, for data of ``shape`` = [batch, ...] (N features
    per sample).

    Derivation. The seed's theorem starts the backward ODE uniformly on the upper hemisphere of
    radius r -> infinity; eq. 101 starts it on the plane z = z_max instead, i.e. the hemisphere's
    points are carried radially (along their rays from the origin, the directions in which the far
    field points) onto that plane. A uniform point u = (u_x, u_z) on the unit sphere S^N of R^{N+1}
    with u_z > 0 lands at x = z_max u_x / u_z. For u = g / |g| with g ~ N(0, I_{N+1}) this is

        x = z_max g_x / |g_z|,   so   R^2 / (R^2 + z_max^2) = |g_x|^2 / (|g_x|^2 + g_z^2) ~ Beta(N/2, 1/2)

    (R = |x|; a chi^2_N over itself plus an independent chi^2_1), the direction x / R is uniform, and
    the density on the plane is p(x) proportional to z_max / (|x|^2 + z_max^2)^((N+1)/2) (for N = 1 a
    Cauchy law of scale z_max). The radial law is the Beta one above: R = z_max sqrt(B / (1 - B)).

    Drawn as that ratio of normals from diffkern's stream: sample n uses row n + sample_offset of
    ``dk.randn((batch, N + 1), seed, step=0)``, so the prior is the same on every device and batch
    split. Heavy-tailed: float16 can overflow for the rare |g_z| ~ 1e-4.

    ``max_radius``: samples farther than this from the origin are moved along their rays to it (the
    law above, truncated onto the sphere of that radius). A learned field is trained only as far out as
    its perturbations reach, and the tail lies beyond: for 64 features at z_max = 40 the prior's median
    radius is 470 and 8% of its radii exceed 3,200, where PFGM's default perturbations stop near 430-510.
    """
    dims = ops.check_shape(shape)
    if len(dims) < 2 or dims[0] < 1:
        raise ValueError(f"shape must be [batch, ...] with at least one feature per sample, got {tuple(dims)}")
    z_max = check_positive("z_max", z_max)
    check_dtype(dtype)
    batch, features = dims[0], math.prod(dims[1:])
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = randn((batch, features + 1), seed=seed, step=0, sample_offset=sample_offset, device=resolve_device(device),
              dtype=draw_dtype)
    x = z_max * g[:, :features] / g[:, features:].abs()
    if max_radius is not None:
        max_radius = check_positive("max_radius", max_radius)
        x = x * (max_radius / x.norm(dim=1, keepdim=True)).clamp(max=1.0)
    return x.reshape(dims).to(dtype)


def field_parts(out, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E_x shaped like x, E_z [batch]) from a field_fn result: a pair, or one tensor [batch, N + 1]."""
    batch, features = x.shape[0], x[0].numel()
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        field_x, field_z = out
        if field_x.shape != x.shape and field_x.shape != (batch, features):
            raise ValueError(f"field_fn returned an x part of shape {tuple(field_x.shape)} for x of shape "
                             f"{tuple(x.shape)}")
        if field_z.numel() != batch or (field_z.dim() > 1 and field_z.shape[0] != batch):
            raise ValueError(f"field_fn returned a z part of shape {tuple(field_z.shape)}; expected [{batch}]")
        field_x = field_x.reshape(x.shape)
    elif isinstance(out, torch.Tensor):
        if out.shape != (batch, features + 1):
            raise ValueError(f"field_fn returned one tensor of shape {tuple(out.shape)}; expected [{batch}, "
                             f"{features + 1}] (the x part flattened, then the z part) or a pair (E_x, E_z)")
        field_x, field_z = out[:, :features].reshape(x.shape), out[:, features]
    else:
        raise ValueError(f"field_fn must return a pair (E_x, E_z) or one tensor [batch, N + 1], got "
                         f"{type(out).__name__}")
    if field_x.device != x.device or field_z.device != x.device:
        raise ValueError(f"field_fn returned tensors on {field_x.device} / {field_z.device} for x on {x.device}")
    return field_x.to(x.dtype), field_z.reshape(batch)


def _integrate(field_fn: Callable, x: torch.Tensor, path: _Path, *, progress: bool, desc: str,
               callback: Optional[Callable]) -> torch.Tensor:
    """x at path.z_end from x at path.z_start along dx/dz = E_x / E_z (either direction of z)."""
    batch = x.shape[0]
    num_steps = path.num_steps
    z_values, taus = _levels(path.z_start, path.z_end, num_steps, path.time)
    # dx/dtau = J(z) E_x / E_z with J = 1 (tau = z) or z (tau = log z)
    jacobian = (lambda z: z) if path.time == "log_z" else (lambda z: 1.0)
    table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    z_per_step = list(torch.tensor(z_values, dtype=torch.float64).to(device=x.device, dtype=table_dtype)
                      .reshape(-1, 1).expand(-1, batch).unbind(0))
    # One per-sample table per launch kind, reused: d = 1, and f (and h) = step / E_z written each step.
    col_d, col_f, col_h = coefficients.INDEX["d"], coefficients.INDEX["f"], coefficients.INDEX["h"]
    euler = torch.zeros(batch, len(coefficients.FIELDS), dtype=table_dtype, device=x.device)
    euler[:, col_d] = 1
    heun = euler.clone()
    bad = torch.zeros(batch, dtype=torch.bool, device=x.device)
    signs = []  # E_z > 0 for the field E, v_z < 0 for v = -sqrt(N) E / |E|: either, one per sample

    def field(x_now, i):
        field_x, field_z = field_parts(field_fn(x_now, z_per_step[i]), x_now)
        field_z = field_z.to(table_dtype)
        if not signs:
            signs.append(torch.where(field_z < 0, -1.0, 1.0).to(table_dtype))
        # nan fails the comparison, so one test catches zero, nan and a sign change; inf separately
        torch.logical_or(bad, ~(field_z * signs[0] > 0) | field_z.isinf(), out=bad)
        return field_x, field_z

    for i in progress_bar(range(num_steps), progress, desc):
        h = taus[i + 1] - taus[i]
        field_x, field_z = field(x, i)
        euler[:, col_f] = (h * jacobian(z_values[i])) / field_z
        x_next = ops.fused_step(x, field_x, None, None, None, None, coefficients=euler, row=-1)[0]
        if path.solver == "heun":
            field_x_next, field_z_next = field(x_next, i + 1)
            heun[:, col_f] = (h / 2 * jacobian(z_values[i + 1])) / field_z_next
            heun[:, col_h] = (h / 2 * jacobian(z_values[i])) / field_z
            x_next = ops.fused_step(x, field_x_next, None, field_x, None, None, coefficients=heun, row=-1)[0]
        if callback is not None:
            # straight on to z = 0 along the field's direction at the step's start
            slope = (z_values[i] / field_z).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            callback(i, (z_values[i], z_values[i + 1]), x_next, x - slope * field_x)
        x = x_next
    if compiling():  # in the graph, without a host synchronisation (and without the samples' numbers)
        torch._assert_async(~bad.any(), "field_fn's z component was zero, not finite, or changed sign along a "
                                        "path: dx/dz = E_x / E_z needs E_z of one sign")
    elif bool(bad.any()):  # the one host synchronisation of the run
        samples = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"field_fn's z component was zero, not finite, or changed sign for samples {samples} (of "
                         f"{batch}): dx/dz = E_x / E_z needs E_z of one sign along the path (E_z > 0 above the "
                         "charges; v_z < 0 for the normalised field)")
    return x


@plan
def _levels(z_start, z_end, num_steps, time) -> tuple:
    """The path's z values and its times tau (z, or log z), num_steps + 1 of each, as lists."""
    if time == "log_z":
        levels = torch.linspace(math.log(z_start), math.log(z_end), num_steps + 1, dtype=torch.float64).exp()
        levels[0], levels[-1] = z_start, z_end
        return levels.tolist(), levels.log().tolist()
    levels = torch.linspace(z_start, z_end, num_steps + 1, dtype=torch.float64)
    return levels.tolist(), levels.tolist()


def _reporter(callback):
    """callback as a function of (i, levels, x, denoised), through the one callback contract."""
    adapted = step_callback(callback, ("i", "level_next", "x"))
    if adapted is None:
        return None
    return lambda i, levels, x, denoised: adapted(StepInfo(i, "z", levels[0], levels[1], x, denoised))


def sample_pfgm(field_fn: Callable, shape, *, z_max: float = 40.0, z_min: float = 1e-3, num_steps: int = 100,
                solver: str = "heun", time: str = "log_z", seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, sample_offset: int = 0, x_T: Optional[torch.Tensor] = None,
                progress: bool = False, callback: Optional[Callable] = None,
                max_radius: Optional[float] = None) -> torch.Tensor:
    """PFGM sampling: the backward ODE dx/dz = E_x / E_z (eq. 101) from the prior on the plane
    z = z_max (``pfgm_prior``, or ``x_T``) down to z = z_min.

    ``field_fn(x, z)`` gets the state [batch, ...] and z as a float tensor [batch] and returns the
    field, raw (E, eq. 98) or normalised (v, eq. 99), at any positive per-sample scale, as a pair
    (E_x shaped like x, E_z [batch]) or as one tensor [batch, N + 1] (x part flattened, z part last).
    The z part must keep one sign along each path (E_z > 0 above the charges, v_z < 0); a zero,
    non-finite or sign-changing z part is reported after the run (one host synchronisation).

    ``solver``: "heun" (default; two field evaluations per step, second order: on the exact empirical
    field it reaches the data with a fraction of Euler's evaluations) or "euler" (one, first order).
    ``time``: "log_z" (default, even steps in log z) or "z" (see the module docstring). z_max sets how
    far out the run starts relative to the data's scale (the theorem's r -> infinity; PFGM's CIFAR-10
    DDPM++ configuration samples from z_max = 50 to 1e-3, in log z, for images in [-1, 1]).
    ``callback(info)`` sees each step: info.level is z before the step, info.x the state after it, and
    info.denoised the estimate x - z E_x / E_z of where the field's current direction meets z = 0.
    ``max_radius`` truncates the prior's radii (``pfgm_prior``): for a learned field, about the largest
    radius its training perturbations reach; None (default) keeps the exact law.
    """
    path = _Path.checked((z_min, z_max), num_steps, solver, time).reversed()
    check_dtype(dtype)
    dims = tuple(check_shape(shape))
    if x_T is not None:
        if max_radius is not None:
            raise ValueError("max_radius shapes the prior's samples; with x_T given there are none to shape")
        if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != dims:
            raise ValueError(f"x_T must be a tensor of shape {dims}, got "
                             f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        x = x_T.to(device=resolve_device(device), dtype=dtype)
    else:
        x = pfgm_prior(dims, path.z_start, seed=seed, device=device, dtype=dtype, sample_offset=sample_offset,
                       max_radius=max_radius)
    return _integrate(field_fn, x, path, progress=progress, desc=f"pfgm ({solver})", callback=_reporter(callback))


def pfgm_forward(field_fn: Callable, x0: torch.Tensor, *, z_min: float = 1e-3, z_max: float = 40.0,
                 num_steps: int = 100, solver: str = "heun", time: str = "log_z", progress: bool = False,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """The forward ODE (eq. 101 run upward): data x0 at z = z_min (just above the charges, where the
    field is finite) to the plane z = z_max. Encodes data into the prior's plane; followed by
    ``sample_pfgm(..., x_T=result)`` with the same settings it returns to x0 up to the solver's error."""
    path = _Path.checked((z_min, z_max), num_steps, solver, time)
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.dtype not in (torch.float16, torch.bfloat16,
                                                                             torch.float32, torch.float64):
        raise ValueError("x0 must be a floating-point tensor [batch, ...] (float16, bfloat16, float32 or float64)")
    if x0.shape[0] == 0:
        return x0.clone()
    return _integrate(field_fn, x0, path, progress=progress, desc="pfgm forward", callback=_reporter(callback))
