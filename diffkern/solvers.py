"""Multistep and flow samplers on the widened fused step (ops.linear_step): DPM-Solver++ and flow
matching. Each is a short loop of one model call and one launch per step; the rows of the whole run
are computed once, in float64, before the loop (diffkern.coefficients.dpmpp_update).

Noise contract (as the other samplers): x_T is ``dk.randn(shape, seed, step=0, sample_offset)`` times
the prior scale, and step i (0-based) of a stochastic sampler draws ``dk.randn(shape, seed,
step=i + 1, sample_offset)`` inside the kernel, so a batch split into calls with matching
``sample_offset`` gives the same samples, on the CPU and on CUDA.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from . import coefficients, ops
from .samplers import _check_positive_int, _progress, _score_scales, _time_grid, call_model, model_output_of
from .steps import check_real
from .noise import randn, resolve_device
from .schedules import DDPMSchedule
from .sde import SDE, check_sigmas


class _Grid:
    """A sampling run's noise levels as (alpha, sigma) pairs with x_t = alpha x0 + sigma eps, what
    the model is given at each level, and how its output becomes an x0 prediction."""

    def __init__(self, alphas, sigmas, model_times, time_dtype, x0_from_output, prior_scale, label):
        self.alphas, self.sigmas = [float(a) for a in alphas], [float(s) for s in sigmas]
        self.model_times, self.time_dtype = model_times, time_dtype
        self.x0_from_output = x0_from_output  # (alpha, sigma, i) -> (coefficient of x, of model output)
        self.prior_scale = prior_scale
        self.label = label  # the value handed to callbacks at level i


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_timesteps(timesteps, T: int) -> list:
    values = torch.as_tensor(timesteps).flatten().tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    if not values or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise ValueError(f"timesteps must be a non-empty sequence of ints, got {timesteps!r}")
    if not all(0 <= t < T for t in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must decrease strictly within [0, {T}), got {values[:8]}")
    return values


def _dpmpp_grid(sigmas, sched, sde, num_steps, timesteps, timestep_spacing, prediction_type, parameterization,
                eps) -> _Grid:
    given = [name for name, value in (("sigmas", sigmas), ("sched", sched), ("sde", sde)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of sigmas= (a denoiser D(x, sigma)), sched= (a DDPM model(x, t)) "
                         f"and sde= (a score model(x, t)); got {given or 'none'}")
    if sched is None and prediction_type != "epsilon":
        raise ValueError(f"prediction_type={prediction_type!r} goes with sched= (a DDPM model); with sigmas= the "
                         "model is a denoiser and with sde= a score model (see parameterization)")
    if sde is None and parameterization != "score":
        raise ValueError(f"parameterization={parameterization!r} goes with sde= (a score model)")
    if sigmas is not None:
        if num_steps is not None or timesteps is not None:
            raise ValueError("num_steps and timesteps go with sched= or sde=; with sigmas= the steps are "
                             "len(sigmas) - 1")
        s = check_sigmas(sigmas)
        return _Grid([1.0] * len(s), s.tolist(), s, None, lambda a, sg, i: (0.0, 1.0), float(s[0]),
                     s.tolist())
    if sched is not None:
        if not isinstance(sched, DDPMSchedule):
            raise TypeError(f"sched must be a diffkern.DDPMSchedule, got {type(sched).__name__}")
        coefficients.check_prediction_type(prediction_type)
        if timesteps is not None:
            if num_steps is not None or timestep_spacing is not None:
                raise ValueError("give timesteps= or num_steps= (with timestep_spacing=), not both")
            timesteps = _check_timesteps(timesteps, sched.num_train_timesteps)
        else:
            timesteps = sched.timesteps(num_steps, timestep_spacing)
        abar = [float(sched.alphas_cumprod[t]) for t in timesteps] + [1.0]

        def x0_ddpm(alpha, sigma, i):
            if prediction_type == "epsilon":
                return 1.0 / alpha, -sigma / alpha
            if prediction_type == "sample":
                return 0.0, 1.0
            return alpha, -sigma  # v = alpha eps - sigma x0

        return _Grid([math.sqrt(a) for a in abar], [math.sqrt(1.0 - a) for a in abar],
                     torch.tensor(timesteps, dtype=torch.int64), torch.int64, x0_ddpm, 1.0, timesteps + [-1])
    if timesteps is not None:
        raise ValueError("timesteps= goes with sched=")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffkern SDE (VPSDE, SubVPSDE, VESDE), got {type(sde).__name__}")
    t = _time_grid(sde, _check_positive_int("num_steps", 100 if num_steps is None else num_steps), eps)
    scale = _score_scales(parameterization, sde, t)  # the model output times scale is the score
    alphas, stds = sde.mean_coef(t), sde.marginal_std(t)

    def x0_score(alpha, sigma, i):
        # x0 = (x + sigma^2 score) / alpha
        return 1.0 / alpha, sigma ** 2 * float(scale[i]) / alpha

    return _Grid(alphas.tolist(), stds.tolist(), t, None, x0_score, sde.prior_std, t.tolist())


def _dpmpp_orders(grid: _Grid, order: int, lower_order_final: bool) -> list:
    n = len(grid.sigmas) - 1
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        if grid.sigmas[i + 1] == 0.0:
            k = 1  # the step onto the data: x = x0 (both k-diffusion and diffusers)
        if lower_order_final and n < 15:  # diffusers' lower_order_final, for short schedules
            k = min(k, n - i)
        orders.append(k)
    return orders


def sample_dpmpp(model, shape, sigmas=None, *, sched: Optional[DDPMSchedule] = None, sde: Optional[SDE] = None,
                 num_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
                 timestep_spacing: Optional[str] = None, prediction_type: str = "epsilon", parameterization: str = "score", eps: float = 1e-3,
                 order: int = 2, solver_type: str = "midpoint", eta: float = 0.0, s_noise: float = 1.0,
                 lower_order_final: bool = True, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                 sample_offset: int = 0, x_T: Optional[torch.Tensor] = None, progress: bool = False,
                 callback: Optional[Callable] = None) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022): multistep exponential-integrator sampling with x0 predictions,
    of order 1, 2 or 3 (``order``; 2M and 3M), deterministic (``eta=0``, the probability-flow ODE)
    or stochastic (``eta > 0``; ``eta=1`` is SDE-DPM-Solver++). One model call per step.

    Give exactly one noise schedule, which also says what ``model`` is:

    * ``sigmas`` (decreasing, e.g. ``dk.karras_sigmas(n, ...)`` ending in 0): ``model(x, sigma)`` is a
      denoiser returning x0 (k-diffusion / EDM); x_T = sigmas[0] z. With eta=0 this is k-diffusion's
      ``sample_dpmpp_2m`` (order 2, midpoint), with eta > 0 ``sample_dpmpp_2m_sde``, and order 3 with
      ``solver_type="heun"`` is ``sample_dpmpp_3m_sde``.
    * ``sched`` (a dk.DDPMSchedule): ``model(x, t)`` with int64 timesteps returns ``prediction_type``
      (epsilon, sample, v_prediction) as diffusers' UNets do; ``num_steps`` timesteps spaced by
      ``timestep_spacing`` as ``sched.timesteps`` spaces them (diffusers' DDIM rules; for
      DPMSolverMultistepScheduler's own leading / linspace rounding pass its ``timesteps=``, a
      decreasing list of ints), and a last step onto the data (diffusers' DPMSolverMultistepScheduler with
      ``final_sigmas_type="zero"``); x_T = z.
    * ``sde`` (VPSDE, SubVPSDE, VESDE): ``model(x, t)`` with float times returns the score (or, with
      ``parameterization="epsilon"``, the noise prediction); ``num_steps`` (default 100) equal steps
      in t from T to ``eps``, as dk.sample_ode; x_T from the prior.

    The order rises as x0 predictions accumulate (first step order 1, second at most 2); the step onto
    sigma = 0 is first order; ``lower_order_final`` lowers the last steps of schedules shorter than 15
    steps as diffusers does. ``solver_type`` picks the second-order correction (midpoint or heun) of
    every second-order step, the warm-up step of order 3 included, as diffusers does; the third-order
    step itself is heun-type. ``s_noise`` scales the injected noise. ``callback(i, level, x, x0)``
    sees each step (level: sigma, timestep or t). Returns x0 of ``shape`` and ``dtype`` on ``device``.
    """
    _check_choice("order", order, (1, 2, 3))
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    eta, s_noise = check_real("eta", eta), check_real("s_noise", s_noise)
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
    grid = _dpmpp_grid(sigmas, sched, sde, num_steps, timesteps, timestep_spacing, prediction_type, parameterization,
                       eps)
    orders = _dpmpp_orders(grid, order, lower_order_final)
    run = _LinearRun(shape, seed, device, dtype, sample_offset)
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(grid.alphas, grid.sigmas)]
    rows, noisy = {}, []
    for i, k in enumerate(orders):
        alpha, sigma = grid.alphas[i], grid.sigmas[i]
        c_x, c_m, c_z = coefficients.dpmpp_update(
            k, alpha, sigma, grid.alphas[i + 1], grid.sigmas[i + 1], [lam[i - j] - lam[i - j - 1] for j in range(k - 1)],
            eta=eta, s_noise=s_noise, solver_type=solver_type)
        a_x, a_m = grid.x0_from_output(alpha, sigma, i)
        # inputs: x, model output, then the kept x0 predictions m1, m2
        rows.setdefault(k, []).append(coefficients.linear_row(
            [a_x, a_m] + [0.0] * (k - 1), [(c_m[0], [c_x, 0.0] + c_m[1:], c_z)]))
        noisy.append(c_z != 0.0)
    tables = {k: run.table(r) for k, r in rows.items()}
    row_of, seen = [], {}
    for k in orders:
        row_of.append(seen.get(k, 0))
        seen[k] = seen.get(k, 0) + 1
    times = run.per_step(grid.model_times, grid.time_dtype)
    x = run.initial(x_T, grid.prior_scale)
    history: list = []  # x0 predictions, newest first
    for i in _progress(range(len(orders)), progress, f"DPM-Solver++({order}M)"):
        k = orders[i]
        m = run.model_output(call_model(model, x, times[i]), x)
        x, x0 = run.step([x, m] + history[:k - 1], tables[k], row_of[i], x0=True, noise_step=i + 1 if noisy[i] else None)
        history = [x0] + history[:order - 2]
        if callback is not None:
            callback(i, grid.label[i], x, x0)
    return x


def sample_flow(velocity_fn, shape, sigmas=None, *, num_steps: int = 50, shift: float = 1.0,
                solver: str = "euler", seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                sample_offset: int = 0, x_T: Optional[torch.Tensor] = None, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """Flow matching / rectified flow: integrates dx/dt = v(x, t) from t = 1 (x_T = z) to t = 0 (the
    data), where x_t = (1 - t) x0 + t z and ``velocity_fn(x, t)`` (t a float tensor [batch]) returns the
    velocity v = z - x0 (diffusers' FlowMatch* schedulers and SD3 / Flux transformers predict it; they
    take the timestep 1000 t).

    The times: ``sigmas`` if given (decreasing from 1 toward 0, e.g. a diffusers scheduler's
    ``sigmas``), else ``num_steps`` equal steps from 1 to 0 warped by ``shift`` as diffusers' shift does
    (t -> shift t / (1 + (shift - 1) t); shift > 1 spends more steps at high noise). ``solver``:
    "euler" (one call per step, first order) or "heun" (two calls, second order; the step onto t = 0
    is an Euler step, as diffusers' FlowMatchHeunDiscreteScheduler and EDM do). Deterministic given
    x_T. ``callback(i, t, x, x0)`` sees each step, x0 = x_t - t v the current estimate of the data.
    """
    _check_choice("solver", solver, ("euler", "heun"))
    if sigmas is None:
        num_steps = _check_positive_int("num_steps", num_steps)
        shift = check_real("shift", shift)
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        t = shift * t / (1 + (shift - 1) * t)
    else:
        t = check_sigmas(sigmas)
        if float(t[0]) > 1.0:
            raise ValueError(f"sigmas are flow times in [0, 1], got a first value {float(t[0])}")
    run = _LinearRun(shape, seed, device, dtype, sample_offset)
    levels = t.tolist()
    euler_rows, heun_rows = [], []
    for i in range(len(levels) - 1):
        s, dt = levels[i], levels[i + 1] - levels[i]
        euler_rows.append(coefficients.linear_row([1.0, -s], [(0.0, [1.0, dt], 0.0)]))
        heun_rows.append(coefficients.linear_row([1.0, -s, 0.0], [(0.0, [1.0, dt / 2, dt / 2], 0.0)]))
    euler, heun = run.table(euler_rows), run.table(heun_rows)
    times = run.per_step(t, None)
    x = run.initial(x_T, 1.0)
    want_x0 = callback is not None
    for i in _progress(range(len(levels) - 1), progress, f"flow ({solver})"):
        v = run.model_output(model_output_of(velocity_fn(x, times[i])), x)
        if solver == "heun" and levels[i + 1] > 0:
            (x_pred,) = run.step([x, v], euler, i)
            v_next = run.model_output(model_output_of(velocity_fn(x_pred, times[i + 1])), x)
            result = run.step([x, v, v_next], heun, i, x0=want_x0)
        else:
            result = run.step([x, v], euler, i, x0=want_x0)
        x = result[0]
        if callback is not None:
            callback(i, levels[i], x, result[1])
    return x


class _LinearRun:
    """Device, dtypes and noise keys of one run of ops.linear_step calls."""

    def __init__(self, shape, seed, device, dtype, sample_offset):
        self.shape = tuple(ops.check_shape(shape))
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        ops._noise_args(list(self.shape), seed, 0, sample_offset, 0, None, torch.device("cpu"))
        self.seed, self.sample_offset = seed, sample_offset
        self.device, self.dtype = resolve_device(device), dtype
        self.table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.batch = self.shape[0] if self.shape else 1

    def table(self, rows: Sequence[list]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float64).to(device=self.device, dtype=self.table_dtype)

    def per_step(self, values, dtype) -> list:
        """values[i] as a [batch] tensor on the device, made before the loop (no copies inside it)."""
        dtype = dtype or (torch.float64 if self.dtype == torch.float64 else torch.float32)
        values = torch.as_tensor(values).to(device=self.device, dtype=dtype)
        return list(values.reshape(-1, 1).expand(-1, self.batch).unbind(0))

    def initial(self, x_T, scale: float) -> torch.Tensor:
        if x_T is not None:
            if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T must be a tensor of shape {self.shape}, got "
                                 f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
            return x_T.to(device=self.device, dtype=self.dtype)
        return randn(self.shape, seed=self.seed, step=0, sample_offset=self.sample_offset, device=self.device,
                     dtype=self.dtype) * scale

    def model_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")
        return out.to(x.dtype) if out.dtype != x.dtype else out

    def step(self, inputs, table, row, x0=False, noise_step=None) -> list:
        return ops.linear_step(inputs, coefficients=table, row=row, outputs=1, x0=x0,
                               stream_noise=noise_step is not None, seed=self.seed,
                               step=noise_step or 0, sample_offset=self.sample_offset)
