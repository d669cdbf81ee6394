"""Noise schedules, in float64 on the host (computed once per sampling run, never stored in half
precision: bf16/fp16 coefficient tables are a known source of NaNs near t = 0 and t = T)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._graph import PlanArgument
from ._validate import check_positive_int

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
_MAX_CACHED_TABLES = 64


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s in [0, 1],
    discretised as beta_i = 1 - abar((i + 1) / T) / abar(i / T), capped at max_beta."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


class DDPMSchedule(PlanArgument):
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) of DDPM, t = 0 .. T-1.

    ``beta_schedule`` is ``linear`` (betas evenly spaced from beta_start to beta_end),
    ``scaled_linear`` (their square roots evenly spaced, as in latent diffusion), ``cosine``
    (alias ``squaredcos_cap_v2``; betas capped at 0.999) or ``sigmoid``; or pass ``betas``.
    The definitions, and the ``timestep_spacing`` of strided inference (``leading``, ``linspace``,
    ``trailing``), are those of diffusers' DDPMScheduler, so a model trained there samples here.
    ``betas``, ``alphas`` and ``alphas_cumprod`` are float64 CPU tensors.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, betas: Optional[Sequence[float]] = None,
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        check_positive_int("num_train_timesteps", num_train_timesteps)
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        T = num_train_timesteps
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
            if betas.numel() != T:
                if num_train_timesteps != 1000:
                    raise ValueError(f"{betas.numel()} betas given for num_train_timesteps={T}")
                T = betas.numel()
            beta_schedule = "custom"
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule in ("cosine", "squaredcos_cap_v2"):
            betas = _cosine_betas(T)
        elif beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} or betas given, got {beta_schedule!r}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            bad = betas[~((betas > 0) & (betas < 1))]
            raise ValueError(f"betas must lie in (0, 1); got {bad[:4].tolist()} (check beta_start/beta_end)")
        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._tables: dict = {}  # device coefficient tables, see device_table

    def __repr__(self) -> str:
        return (f"DDPMSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"timestep_spacing={self.timestep_spacing!r})")

    def timesteps(self, num_inference_steps: Optional[int] = None, timestep_spacing: Optional[str] = None) -> list:
        """The timesteps of a sampling run, from noisiest to cleanest, as Python ints.

        All T timesteps by default; otherwise ``num_inference_steps`` of them, spaced as diffusers'
        schedulers space them (``leading``: 0, k, 2k, ... + steps_offset with k = T // n;
        ``linspace``: round(linspace(0, T-1, n)); ``trailing``: round(arange(T, 0, -T/n)) - 1).
        """
        T = self.num_train_timesteps
        n = T if num_inference_steps is None else num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}] (the training timesteps), got {n!r}")
        spacing = timestep_spacing or self.timestep_spacing
        if spacing == "leading":
            k = T // n
            steps = [i * k + self.steps_offset for i in range(n)]
        elif spacing == "linspace":
            steps = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().tolist()
        elif spacing == "trailing":
            k = T / n
            return [int(round(T - i * k)) - 1 for i in range(n)]  # already descending
        else:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        if max(steps) >= T:
            raise ValueError(f"steps_offset={self.steps_offset} puts timesteps past T={T}")
        return steps[::-1]

    def alphas_cumprod_at(self, t) -> torch.Tensor:
        """abar_t in float64, with abar = 1 for t < 0 (the clean data after the last step). t is an int
        or an int64 tensor (on any device: the lookup then runs there, without a host sync)."""
        if isinstance(t, torch.Tensor):
            table = self.alphas_cumprod.to(t.device)
            return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=torch.float64, device=t.device))
        return torch.tensor(float(self.alphas_cumprod[t]) if t >= 0 else 1.0, dtype=torch.float64)

    def device_table(self, key: tuple, build, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Coefficient rows for every timestep t, ``build(abar_t, abar_prev)`` with prev = t - key[1]
        (the stride), on ``device`` in ``dtype``; built once per (key, device, dtype) and cached (at most
        64 tables), so a loop of single steps does no host work and no copy."""
        full_key = key + (device, dtype)
        table = self._tables.get(full_key)
        if table is None:
            stride = key[1]
            t = torch.arange(self.num_train_timesteps)
            table = build(self.alphas_cumprod_at(t), self.alphas_cumprod_at(t - stride)).to(device=device, dtype=dtype)
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[full_key] = table
        return table
