"""What every k-diffusion drop-in shares: the model's calling convention (``model(x, sigma * s_in,
**extra_args)`` returning the denoised x0), the callback dict, the progress bar, the noise sources, and
the fused launches.

Each step's update is linear in tensors the step already has (x, the denoised estimates, earlier
derivatives, the noise), so it is one ``ops.linear_step`` launch whose coefficient row was computed
before the loop from a CPU copy of the sigmas: nothing in the loop reads the device. The coefficients
are formed from the scalars k-diffusion forms, with its operations and in the dtype it forms them in
(the sigmas' dtype, or float32 for the DPM-Solver levels it makes with ``torch.tensor``), for all steps
at once, so float64 runs agree with it to rounding and float32 runs to float32 rounding.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .. import coefficients, ops
from .._graph import compiling, constant_levels, device_table, plan
from .._validate import check_uint
from ..noise import SAMPLING_STREAM, randn


class StreamNoiseSampler:
    """A k-diffusion noise sampler on diffkern's stream: its k-th call returns ``dk.randn(x.shape,
    seed, step=k, sample_offset)`` (k = 1, 2, ...), and diffkern's drop-ins draw the same numbers inside
    their fused kernels instead of calling it. So a run is the same on CPU and CUDA and for any split of
    the batch (pass each part's first sample index as ``sample_offset``). Made by
    ``stream_noise_sampler``; one sampler serves one run (its counter is the run's)."""

    def __init__(self, seed: int, x: Optional[torch.Tensor] = None, sample_offset: int = 0):
        self.seed = check_uint("seed", seed, 1 << 64)
        self.sample_offset = check_uint("sample_offset", sample_offset, 1 << 64)
        self.like = None
        self.calls = 0
        if x is not None:
            self.bind(x)

    def bind(self, x: torch.Tensor) -> "StreamNoiseSampler":
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"a stream noise sampler draws noise like a floating tensor, got {type(x).__name__}")
        ops.noise_args(list(x.shape), self.seed, 0, self.sample_offset, SAMPLING_STREAM, None, x.device)
        self.like = (tuple(x.shape), x.device, x.dtype)
        return self

    def next_step(self) -> int:
        self.calls += 1
        if self.calls >= 1 << 32:
            raise ValueError("a stream noise sampler draws at most 2^32 - 1 times")
        return self.calls

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        if self.like is None:
            raise ValueError("this stream noise sampler is not bound to a tensor: make it with "
                             "stream_noise_sampler(seed, x) to call it yourself")
        shape, device, dtype = self.like
        return randn(shape, seed=self.seed, step=self.next_step(), sample_offset=self.sample_offset, device=device,
                     dtype=dtype)


def stream_noise_sampler(seed: int, x: Optional[torch.Tensor] = None, sample_offset: int = 0) -> StreamNoiseSampler:
    """A noise sampler on diffkern's stream (see StreamNoiseSampler): pass it as ``noise_sampler=`` to a
    ``diffkern.k_diffusion`` sampler (which binds it to x), or bind it with ``x`` to call it directly or
    hand it to k-diffusion's own functions (the same numbers)."""
    return StreamNoiseSampler(seed, x, sample_offset)


class Draw(NamedTuple):
    """One step's noise: a tensor, or the stream step the kernel draws."""

    tensor: Optional[torch.Tensor] = None
    stream_step: Optional[int] = None


class Noise:
    """Where a run's noise comes from, called where k-diffusion calls its noise sampler:

    - "stream": a StreamNoiseSampler (``seed=`` makes one): drawn inside the kernel;
    - "sampler": a given noise sampler (a Brownian tree, say), called with k-diffusion's arguments;
    - "global": torch.randn_like(x) from torch's global generator, as k-diffusion's default.

    With ``needed`` False (no step of the run adds noise: eta = 0, no churn) the global generator is not
    drawn from; k-diffusion draws and discards, so the samples are the same and only the generator's
    state afterwards differs."""

    def __init__(self, x: torch.Tensor, noise_sampler: Optional[Callable], seed: Optional[int], sample_offset: int,
                 needed: bool = True):
        if seed is not None and noise_sampler is not None:
            raise ValueError("give seed= (diffkern's stream) or noise_sampler=, not both")
        if seed is not None:
            noise_sampler = StreamNoiseSampler(seed, sample_offset=sample_offset)
        elif sample_offset:
            raise ValueError("sample_offset goes with seed= (diffkern's stream)")
        if isinstance(noise_sampler, StreamNoiseSampler):
            self.mode = "stream"
            if noise_sampler.like is None:
                noise_sampler.bind(x)
            elif noise_sampler.like[0] != tuple(x.shape):
                raise ValueError(f"the stream noise sampler was bound to shape {noise_sampler.like[0]}, x has "
                                 f"{tuple(x.shape)}")
        elif noise_sampler is not None:
            if not callable(noise_sampler):
                raise ValueError(f"noise_sampler must be callable (sigma, sigma_next) -> noise, got "
                                 f"{type(noise_sampler).__name__}")
            self.mode = "sampler"
        else:
            self.mode = "global"
        self.sampler, self.needed = noise_sampler, needed

    def draw(self, x: torch.Tensor, sigma, sigma_next) -> Draw:
        if self.mode == "stream":
            return Draw(stream_step=self.sampler.next_step())
        if self.mode == "sampler":
            return Draw(self.sampler(sigma, sigma_next))
        if not self.needed:
            return Draw()
        return Draw(torch.randn_like(x))


def check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating tensor [batch, ...], got "
                         f"{getattr(x, 'dtype', None) or type(x).__name__}")
    return x


def check_sigmas(sigmas, device=None) -> torch.Tensor:
    """The sigmas as k-diffusion takes them (a 1-d float tensor; a list becomes a float32 tensor), checked:
    at least one level, finite, non-negative and non-increasing. Compiled, only a list or tuple (the
    levels are constants of the graph; see diffkern._graph)."""
    if compiling():
        constant_levels("sigmas", sigmas)
        _host_values(sigmas)  # checks them
        return torch.tensor(sigmas, dtype=torch.float32, device=device)
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.tensor(sigmas, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sigmas must be a 1-d tensor of noise levels, got {type(sigmas).__name__}") from None
    if sigmas.dim() != 1 or sigmas.numel() == 0 or not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be a non-empty 1-d float tensor, got {sigmas.dtype} {tuple(sigmas.shape)}")
    levels = sigmas.detach().cpu()
    if not bool(torch.isfinite(levels).all()) or bool((levels[:-1] <= 0).any()) or bool((levels < 0).any()):
        raise ValueError(f"sigmas must be finite and positive, but for a last 0; got {levels.tolist()[:8]}")
    if bool((levels[1:] > levels[:-1]).any()):
        raise ValueError("sigmas must not increase (from the noisiest level down to 0)")
    return sigmas


@plan
def _host_values(sigmas) -> list:
    """A list of levels as k-diffusion takes it (a float32 tensor), checked, as floats."""
    return check_sigmas(sigmas).tolist()


@plan
def _host_plan(planner: Callable, values: tuple, options: tuple):
    """planner(levels, values, *options) on the CPU copy of a compiled run's levels (float32, as a list
    becomes in k-diffusion)."""
    levels = torch.tensor(values, dtype=torch.float32)
    return planner(levels, levels.tolist(), *options)


class RowBook:
    """Coefficient rows by kind, as a planner collects them: add(kind, row) returns the row's index;
    ``rows`` is ((kind, rows), ...) (a plan returns no dict: dynamo cannot guard one it made a constant)."""

    def __init__(self):
        self._rows: dict = {}

    def add(self, kind: str, values: list) -> int:
        rows = self._rows.setdefault(kind, [])
        rows.append(values)
        return len(rows) - 1

    @property
    def rows(self) -> tuple:
        return tuple(self._rows.items())


class Call(NamedTuple):
    """What every sampler is called with, as k-diffusion names it."""

    model: Callable
    x: torch.Tensor
    sigmas: object
    extra_args: Optional[dict]
    callback: Optional[Callable]
    disable: Optional[bool]


class NoiseArgs(NamedTuple):
    """The noise options: k-diffusion's noise_sampler, or diffkern's stream (seed, sample_offset)."""

    noise_sampler: Optional[Callable] = None
    seed: Optional[int] = None
    sample_offset: int = 0


def row(coefs, noise: float = 0.0) -> list:
    """A linear_step row with one output: sum of coefs[k] inputs[k] plus noise z."""
    return coefficients.linear_row([0.0] * len(coefs), [(0.0, list(coefs), noise)])


def euler_row(sigma: float, dt: float, noise: float = 0.0) -> list:
    """x + dt (x - D) / sigma (+ noise z) on inputs [x, D]: the Euler step of the probability-flow ODE."""
    return row([1 + dt / sigma, -dt / sigma], noise)


class Run:
    """One call of a drop-in sampler. ``levels`` is a CPU copy of the sigmas (the coefficients are formed
    on it, every step at once, with k-diffusion's operations in the sigmas' dtype), ``values`` the same as
    floats; the original tensor goes to the model and the callback."""

    def __init__(self, model, x: torch.Tensor, sigmas: Optional[torch.Tensor], extra_args, callback, disable,
                 noise: Optional[Noise] = None, given=None):
        if not callable(model):
            raise ValueError(f"model must be callable (x, sigma, **extra_args) -> denoised, got {type(model).__name__}")
        self.model, self.noise = model, noise
        if extra_args is not None and not isinstance(extra_args, dict):
            raise ValueError(f"extra_args must be a dict of keyword arguments for the model, got "
                             f"{type(extra_args).__name__}")
        self.extra_args = {} if extra_args is None else extra_args
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        self.callback, self.disable = callback, disable
        self.sigmas = sigmas
        if sigmas is not None and compiling():
            # the levels as given (a list: check_sigmas refused a tensor), read at trace time
            self.levels, self.values = None, _host_values(given)
        else:
            self.levels = sigmas.detach().cpu() if sigmas is not None else None
            self.values = self.levels.tolist() if sigmas is not None else None
        self.s_in = x.new_ones([x.shape[0]])
        self.dtype, self.device = x.dtype, x.device
        self.table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self._tables = {}

    # ---- before the loop ----

    def plan(self, planner: Callable, *options):
        """planner(levels, values, *options): what a sampler computes from the levels before its loop
        (rows, flags: no tensor of the loop), on the CPU copy; compiled, once at trace time."""
        if not compiling():
            return planner(self.levels, self.values, *options)
        return _host_plan(planner, tuple(self.values), options)

    def tables(self, rows: tuple) -> None:
        """The device tables of ``rows`` (a planner's RowBook.rows: ((kind, rows), ...))."""
        self._tables = {kind: device_table(table, self.device, self.table_dtype) for kind, table in rows}

    def steps(self, n: int):
        if self.disable:  # as trange(n, disable=True), and nothing a compiled graph breaks on
            return range(n)
        from tqdm.auto import trange

        return trange(n, disable=self.disable)

    # ---- in the loop ----

    def denoise(self, x: torch.Tensor, sigma_in: torch.Tensor) -> torch.Tensor:
        denoised = self.model(x, sigma_in, **self.extra_args)
        if not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape:
            raise ValueError(f"the model returned {tuple(getattr(denoised, 'shape', ())) or type(denoised).__name__} "
                             f"for x of shape {tuple(x.shape)}; a k-diffusion model returns the denoised x")
        return denoised

    def launch(self, inputs: list, kind: str, index: int, draw: Optional[Draw] = None, outputs: int = 1) -> list:
        """One fused step: row ``index`` of table ``kind`` applied to ``inputs`` (and the draw's noise)."""
        return self.launch_table(inputs, self._tables[kind], index, draw, outputs)

    def launch_rows(self, inputs: list, outputs: list, draw: Optional[Draw] = None) -> list:
        """One fused step with rows made now: outputs = [(coefficients of the inputs, of the noise)]."""
        values = coefficients.linear_row([0.0] * len(inputs), [(0.0, list(c), z) for c, z in outputs])
        table = torch.tensor([values], dtype=torch.float64).to(device=self.device, dtype=self.table_dtype)
        return self.launch_table(inputs, table, 0, draw, len(outputs))

    def launch_table(self, inputs: list, table: torch.Tensor, index: int, draw: Optional[Draw] = None,
                     outputs: int = 1) -> list:
        inputs = [t if t.dtype == self.dtype else t.to(self.dtype) for t in inputs]
        tensor = stream_step = None
        if draw is not None:
            tensor, stream_step = draw
            if tensor is not None and (tensor.dtype != self.dtype or tensor.device != self.device):
                tensor = tensor.to(device=self.device, dtype=self.dtype)
        seed = sample_offset = 0
        if stream_step is not None:
            seed, sample_offset = self.noise.sampler.seed, self.noise.sampler.sample_offset
        return ops.linear_step(inputs, tensor, coefficients=table, row=index, outputs=outputs,
                               stream_noise=stream_step is not None, seed=seed, step=stream_step or 0,
                               sample_offset=sample_offset)

    def ancestral_loop(self, x: torch.Tensor, plan: list, second_inputs: Callable) -> torch.Tensor:
        """The loop of the two-stage ancestral samplers (DPM-2 and DPM++ 2S): per step, the model at sigma,
        then an Euler step or (a stage launch, the model at the stage's level, the step with the noise).
        plan[i] = (launches, noisy, stage level); second_inputs(x, x_2, denoised_2) -> the step's inputs."""
        sigmas = self.sigmas
        for i in self.steps(len(plan)):
            launches, noisy, level = plan[i]
            denoised = self.denoise(x, sigmas[i] * self.s_in)
            self.report({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            if len(launches) == 1:
                draw = self.noise.draw(x, sigmas[i], sigmas[i + 1]) if noisy else None
                (x,) = self.launch([x, denoised], *launches[0], draw)
                continue
            (x_2,) = self.launch([x, denoised], *launches[0])
            denoised_2 = self.denoise(x_2, level * self.s_in)
            draw = self.noise.draw(x, sigmas[i], sigmas[i + 1]) if noisy else None
            (x,) = self.launch(second_inputs(x, x_2, denoised_2), *launches[1], draw)
        return x

    def report(self, values: dict) -> None:
        if self.callback is not None:
            self.callback(values)

