"""The one sampler registry: each sampler declared once, with the model it takes, its default number
of steps, and the options it reads. The command line (``generate --sampler``), the demo and
``diffkern.distributed`` read it.

Adding a sampler: its row formula (diffkern.coefficients), its function (a module of
diffkern.sampling), one ``_entry`` below, and its tests; ``tests/test_registry.py`` runs every
entry on the built-in mixture through the Python API and the command line.

    from diffkern.sampling import registry
    sampler = registry.make_sampler("ddim", steps=20, eta=0.5)
    x = sampler(model, (16, 2), seed=0)        # the run's own keywords: seed, sample_offset, device, dtype, ...
    sampler.config()                           # {"sampler": "ddim", "steps": 20, "options": {...}}
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .._model import StepInfo
from .._validate import check_choice, check_positive, check_positive_int, check_real
from ..schedules import DDPMSchedule
from ..sde import VESDE, VPSDE, SubVPSDE, karras_sigmas
from .ddpm import sample_ddim, sample_ddpm
from .dpmpp import ORDERS, sample_dpmpp
from .flow import FLOW_SOLVERS, sample_flow
from .karras import sample_euler, sample_euler_ancestral, sample_heun
from .ode import ODE_SOLVERS, sample_ode
from .pfgm import SOLVERS as PFGM_SOLVERS
from .pfgm import sample_pfgm
from .score_sde import sample_euler_maruyama, sample_langevin, sample_pc

# What each kind of model is called with and returns.
MODELS = {
    "epsilon": "model(x, t) with int64 timesteps t of a DDPMSchedule, returning its prediction_type (epsilon)",
    "score": "score_fn(x, t) with float times t of the SDE, returning the score (or epsilon: parameterization)",
    "denoiser": "denoiser(x, sigma) returning the estimate of x0 from x = x0 + sigma z (EDM, k-diffusion)",
    "noise_level_score": "score_fn(x, sigma) of the noise level sigma (NCSN, annealed Langevin)",
    "velocity": "velocity_fn(x, t) returning z - x0 for x_t = (1 - t) x0 + t z (flow matching)",
    "field": "field_fn(x, z) returning the Poisson field (E_x, E_z) above the data plane (PFGM)",
}
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
PARAMETERIZATIONS = ("score", "epsilon")


def _any(name, value):
    return value


@dataclass(frozen=True)
class Option:
    """An option of one or more samplers: its default, what it means (the command line's help), and
    its check (name, value) -> value."""

    default: object
    help: str
    check: Callable = _any


OPTIONS: Dict[str, Option] = {
    "eta": Option(0.0, "noise of DDIM / DPM-Solver++ / ancestral steps (0: deterministic)",
                  lambda n, v: check_real(n, v)),
    "prediction_type": Option("epsilon", "what the DDPM model predicts: epsilon, sample or v_prediction",
                              lambda n, v: check_choice(n, v, PREDICTION_TYPES)),
    "sde": Option("vp", "the score model's SDE: vp, subvp or ve", lambda n, v: check_choice(n, v, tuple(SDES))),
    "sigma_min": Option(None, "the smallest noise level (VE SDE, Karras sigmas, Langevin)",
                        lambda n, v: check_positive(n, v)),
    "sigma_max": Option(None, "the largest noise level (VE SDE, Karras sigmas, Langevin)",
                        lambda n, v: check_positive(n, v)),
    "parameterization": Option("score", "what the score model returns: score or epsilon",
                               lambda n, v: check_choice(n, v, PARAMETERIZATIONS)),
    "solver": Option(None, "the ODE solver (ode: euler, heun, dopri5, bosh3; flow and pfgm: euler or heun)"),
    "order": Option(2, "DPM-Solver++ order: 1, 2 or 3", lambda n, v: check_choice(n, v, ORDERS)),
    "langevin_steps": Option(50, "Langevin steps per noise level", lambda n, v: check_positive_int(n, v)),
    "step_size": Option(2e-3, "Langevin step size at sigma_min (times sigma^2 / sigma_min^2 above it; stable below "
                              "2 sigma_min^2)", lambda n, v: check_positive(n, v)),
    "z_max": Option(40.0, "PFGM's starting plane z = z_max", lambda n, v: check_positive(n, v)),
    "max_radius": Option(None, "PFGM: the prior's radii truncated at this (a learned field is trained only as far "
                               "out as its perturbations reach)", lambda n, v: check_positive(n, v)),
}


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler: ``build(steps, options)`` returns fn(model, shape, **run) with the run's keywords
    (seed, sample_offset, device, dtype, x_T, progress, callback); ``calls(steps, options)`` counts its
    model evaluations. ``batch_invariant`` is False for a sampler whose samples depend on which
    samples share their batch (score_sde's corrector steps by batch-mean norms)."""

    name: str
    label: str
    function: Callable
    model: str
    default_steps: int
    options: Dict[str, object]  # the options it reads, with its defaults
    build: Callable
    calls: Callable = field(default=lambda steps, options: steps)
    batch_invariant: bool = True


def _sde(options):
    sigmas = {k: options[k] for k in ("sigma_min", "sigma_max") if options[k] is not None}
    if options["sde"] != "ve":
        if sigmas:
            raise ValueError(f"{', '.join(sigmas)} goes with sde='ve' (the VE SDE's noise levels)")
        return SDES[options["sde"]]()
    return VESDE(**sigmas)


def _karras(steps, options) -> list:
    """The Karras levels of a run as a list (made when the sampler is: constants of a compiled graph)."""
    return karras_sigmas(steps, options["sigma_min"], options["sigma_max"]).tolist()


def _posterior(function):
    def build(steps, options):
        sched = DDPMSchedule()
        extra = {"eta": options["eta"]} if "eta" in options else {}
        return lambda model, shape, **run: function(model, shape, sched, num_inference_steps=steps,
                                                    prediction_type=options["prediction_type"], **extra, **run)
    return build


def _score_sde(function, solver: bool = False):
    def build(steps, options):
        sde = _sde(options)
        extra = {"solver": options["solver"]} if solver else {}
        return lambda model, shape, **run: function(model, shape, sde, steps,
                                                    parameterization=options["parameterization"], **extra, **run)
    return build


def _edm(function):
    def build(steps, options):
        sigmas = _karras(steps, options)
        return lambda model, shape, **run: function(model, shape, sigmas, **run)
    return build


def _dpmpp(steps, options):
    sigmas = _karras(steps, options)
    return lambda model, shape, **run: sample_dpmpp(model, shape, sigmas, order=options["order"], eta=options["eta"],
                                                    **run)


def _langevin(steps, options):
    sigmas = torch.logspace(math.log10(options["sigma_max"]), math.log10(options["sigma_min"]), steps,
                            dtype=torch.float64).tolist()
    return lambda model, shape, **run: sample_langevin(model, shape, sigmas, options["langevin_steps"],
                                                       step_size=options["step_size"], **run)


def _flow(steps, options):
    return lambda model, shape, **run: sample_flow(model, shape, num_steps=steps, solver=options["solver"], **run)


def _pfgm(steps, options):
    return lambda model, shape, **run: sample_pfgm(model, shape, num_steps=steps, z_max=options["z_max"],
                                                   solver=options["solver"], max_radius=options["max_radius"], **run)


class _StepRecords:
    """k-diffusion's callback dicts ({x, i, sigma, ...}: x before the step) as the one callback record,
    StepInfo (the state after the step): each record goes out when the next step (or the run's end)
    gives its state."""

    def __init__(self, callback, levels: list):
        self.callback, self.levels, self.pending = callback, levels, None

    def __call__(self, values: dict) -> None:
        self.flush(values["x"])
        i = values["i"]
        self.pending = (i, values["denoised"])

    def flush(self, x) -> None:
        if self.pending is not None:
            i, denoised = self.pending
            self.callback(StepInfo(i, "sigma", self.levels[i], self.levels[i + 1], x, denoised))
            self.pending = None


def _k_diffusion(function, noisy: bool):
    """A diffkern.k_diffusion sampler on Karras sigmas, started from sigma_max times the stream's step 0
    and (``noisy``) with its noise from the stream, so that its samples are the same for any batch split."""
    def build(steps, options):
        levels = _karras(steps, options)

        def sample(model, shape, *, seed=0, sample_offset=0, device=None, dtype=torch.float32, x_T=None,
                   progress=False, callback=None):
            from .._model import step_callback
            from ..noise import randn, resolve_device

            device = resolve_device(device)
            # a list becomes k-diffusion's float32 sigmas (and is what a compiled run takes); float64
            # runs keep float64 sigmas
            sigmas = torch.tensor(levels, dtype=torch.float64, device=device) if dtype == torch.float64 else levels
            if x_T is None:
                x = randn(tuple(shape), seed=seed, step=0, sample_offset=sample_offset, device=device,
                          dtype=dtype) * levels[0]
            elif not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T must be a tensor of shape {tuple(shape)}")
            else:
                x = x_T.to(device=device, dtype=dtype)
            records = _StepRecords(step_callback(callback, ("i", "level", "x", "denoised")), levels) \
                if callback is not None else None
            extra = {"eta": options["eta"]} if "eta" in options else {}
            if noisy:
                extra.update(seed=seed, sample_offset=sample_offset)
            x = function(model, x, sigmas, callback=records, disable=not progress, **extra)
            if records is not None:
                records.flush(x)
            return x
        return sample
    return build


def _two_per_step(steps, options):
    return 2 * steps if options.get("solver", "heun") == "heun" else steps


def _flow_calls(steps, options):
    # flow Heun's last step, to t = 0, is an Euler step (Heun would evaluate the model at t = 0)
    return 2 * steps - 1 if options["solver"] == "heun" else steps


_KARRAS = {"sigma_min": 0.002, "sigma_max": 80.0}
_SCORE = {"sde": "vp", "sigma_min": None, "sigma_max": None, "parameterization": "score"}

ENTRIES: Dict[str, SamplerEntry] = {e.name: e for e in (
    SamplerEntry("ddpm", "DDPM", sample_ddpm, "epsilon", 1000, {"prediction_type": "epsilon"},
                 _posterior(sample_ddpm)),
    SamplerEntry("ddim", "DDIM", sample_ddim, "epsilon", 50, {"eta": 0.0, "prediction_type": "epsilon"},
                 _posterior(sample_ddim)),
    SamplerEntry("euler_maruyama", "Euler-Maruyama", sample_euler_maruyama, "score", 1000, dict(_SCORE),
                 _score_sde(sample_euler_maruyama)),
    SamplerEntry("ode", "probability-flow ODE", sample_ode, "score", 100, dict(_SCORE, solver="heun"),
                 _score_sde(sample_ode, solver=True), _two_per_step),
    SamplerEntry("pc", "predictor-corrector", sample_pc, "score", 1000, dict(_SCORE),
                 _score_sde(sample_pc), lambda steps, options: 2 * steps, batch_invariant=False),
    SamplerEntry("euler", "Euler (EDM)", sample_euler, "denoiser", 50, dict(_KARRAS), _edm(sample_euler)),
    SamplerEntry("heun", "Heun (EDM)", sample_heun, "denoiser", 18, dict(_KARRAS), _edm(sample_heun),
                 lambda steps, options: 2 * steps - 1),
    SamplerEntry("euler_ancestral", "Euler-ancestral", sample_euler_ancestral, "denoiser", 50, dict(_KARRAS),
                 _edm(sample_euler_ancestral)),
    # Langevin's step at level i is step_size sigma_i^2 / sigma_min^2, which is stable only while
    # step_size / sigma_min^2 < 2: its noise levels are its own, not the Karras range
    SamplerEntry("langevin", "annealed Langevin", sample_langevin, "noise_level_score", 10,
                 dict(sigma_min=0.05, sigma_max=10.0, langevin_steps=50, step_size=2e-3), _langevin,
                 lambda steps, options: steps * options["langevin_steps"] + 1),
    SamplerEntry("dpmpp", "DPM-Solver++", sample_dpmpp, "denoiser", 20, dict(_KARRAS, order=2, eta=0.0), _dpmpp),
    SamplerEntry("flow", "flow matching", sample_flow, "velocity", 50, {"solver": "euler"}, _flow, _flow_calls),
    SamplerEntry("pfgm", "PFGM", sample_pfgm, "field", 100, {"z_max": 40.0, "solver": "heun", "max_radius": None},
                 _pfgm, _two_per_step),
)}


def _k_entries():
    """k-diffusion's sampler menu (diffkern.k_diffusion), as k_<its name>."""
    from .. import k_diffusion as K

    one, two = (lambda steps, options: steps), (lambda steps, options: 2 * steps - 1)
    table = [("euler", "Euler", False, one), ("euler_ancestral", "Euler ancestral", True, one),
             ("heun", "Heun", False, two), ("dpm_2", "DPM-2", False, two),
             ("dpm_2_ancestral", "DPM-2 ancestral", True, two), ("lms", "LMS", False, one),
             ("dpmpp_2s_ancestral", "DPM++ 2S ancestral", True, two), ("dpmpp_sde", "DPM++ SDE", True, two),
             ("dpmpp_2m", "DPM++ 2M", False, one), ("dpmpp_2m_sde", "DPM++ 2M SDE", True, one),
             ("dpmpp_3m_sde", "DPM++ 3M SDE", True, one)]
    for name, label, noisy, calls in table:
        function = getattr(K, f"sample_{name}")
        takes_eta = "eta" in inspect.signature(function).parameters
        options = dict(_KARRAS, eta=1.0) if takes_eta else dict(_KARRAS)
        # the churn samplers draw nothing without churn; the registry gives them none
        yield SamplerEntry(f"k_{name}", f"{label} (k-diffusion)", function, "denoiser", 30, options,
                           _k_diffusion(function, noisy), calls)


ENTRIES.update({entry.name: entry for entry in _k_entries()})
SAMPLERS: Tuple[str, ...] = tuple(ENTRIES)

_SOLVERS = {"ode": ODE_SOLVERS, "flow": FLOW_SOLVERS, "pfgm": PFGM_SOLVERS}


_PROBE_LEVELS = {"epsilon": None, "score": 0.5, "denoiser": 1.0, "noise_level_score": 1.0, "velocity": 0.5,
                 "field": 1.0}


def probe_model(kind: str, model, shape, *, device=None, dtype=torch.float32) -> None:
    """Calls ``model``, a model of ``kind`` (a key of MODELS), once on two samples of per-sample
    ``shape``; refuses (ValueError) a model that fails there or returns the wrong shape."""
    from .._model import model_output_of
    from ..noise import randn, resolve_device
    from .pfgm import field_parts

    dims = (2, *shape)
    device = resolve_device(device)
    x = randn(dims, seed=0, device=device, dtype=dtype)
    if kind == "epsilon":
        level = torch.full((2,), DDPMSchedule().num_train_timesteps // 2, dtype=torch.int64, device=device)
    else:
        level = torch.full((2,), _PROBE_LEVELS[kind], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                           device=device)
    try:
        with torch.no_grad():
            out = model(x, level)
            if kind == "field":
                field_parts(out, x)
                return
            out = model_output_of(out)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 (any failure of the user's model on this shape)
        raise ValueError(f"the model fails on samples of shape {tuple(shape)}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != dims:
        raise ValueError(f"the model returned shape {tuple(getattr(out, 'shape', ()))} for samples of shape "
                         f"{tuple(shape)} (a batch {dims}); a {kind} model returns its input's shape")


def readers(option: str) -> Tuple[str, ...]:
    """The samplers that read ``option``."""
    return tuple(name for name, entry in ENTRIES.items() if option in entry.options)


@dataclass(frozen=True)
class Sampler:
    """A registry sampler with its steps and options fixed. Call it as
    ``sampler(model, shape, seed=0, sample_offset=0, device=None, dtype=torch.float32, ...)``."""

    name: str
    steps: int
    options: Tuple[Tuple[str, object], ...]
    # built once, here: a call inside torch.compile then finds its SDE and levels made (see diffkern._graph)
    sample_fn: Callable = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "sample_fn", self.entry.build(self.steps, dict(self.options)))

    @property
    def entry(self) -> SamplerEntry:
        return ENTRIES[self.name]

    def __call__(self, model, shape, **run):
        return self.sample_fn(model, shape, **run)

    def model_calls(self) -> int:
        """Model evaluations of one run."""
        return self.entry.calls(self.steps, dict(self.options))

    def config(self) -> dict:
        """What identifies the sampler in a run's configuration: name, steps and every option."""
        return {"sampler": self.name, "steps": self.steps, "options": dict(self.options)}

    def probe(self, model, shape, *, device=None, dtype=torch.float32) -> None:
        """One model evaluation on a batch of two samples of per-sample ``shape``, called as this
        sampler calls it (a mid-level time or noise level): raises a ValueError that says what did
        not fit, before a long run (or a distributed job's files) starts."""
        trained = getattr(model, "diffkern_trained", None)
        if isinstance(trained, dict):
            check_trained(trained, self.entry.model, dict(self.options), f"the {self.name} sampler")
        probe_model(self.entry.model, model, shape, device=device, dtype=dtype)


def _a(word) -> str:
    return f"{'an' if str(word)[:1] in 'aeiou' else 'a'} {word}"


def check_trained(trained: dict, kind: str, options: dict, user: str) -> None:
    """Refuses a model trained by ``diffkern train`` (its ``diffkern_trained`` record: the model kind and
    the sampler options it was trained for) where ``user`` needs a ``kind`` model read with ``options``:
    a v-prediction DDPM model under an epsilon sampler, or a VE score model under a VP sampler, would
    sample something else without an error."""
    if trained.get("kind") != kind:
        users = ", ".join(name for name, entry in ENTRIES.items() if entry.model == trained.get("kind"))
        raise ValueError(f"the model was trained as {_a(trained.get('kind'))} model (objective "
                         f"{trained.get('objective')}), but {user} takes {_a(kind)} model; use {users or 'another'}")
    for name, value in trained.get("options", {}).items():
        if name in options and options[name] != value:
            raise ValueError(f"the model was trained for {name}={value!r} (objective {trained.get('objective')}), "
                             f"but {user} has {name}={options[name]!r}")


def make_sampler(sampler: str, *, steps: Optional[int] = None, **options) -> Sampler:
    """The registry sampler ``sampler`` with ``steps`` (its default when None) and ``options`` (each
    None or omitted: its default). An option the sampler does not read is refused by name."""
    if sampler not in ENTRIES:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    entry = ENTRIES[sampler]
    steps = entry.default_steps if steps is None else check_positive_int("steps", steps)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options are "
                         f"{', '.join(OPTIONS)}")
    resolved = dict(entry.options)
    for name, value in options.items():
        if value is None:
            continue
        if name not in entry.options:
            raise ValueError(f"{name} does not apply to the {sampler} sampler (it reads "
                             f"{', '.join(entry.options) or 'no options'}); {name} goes with "
                             f"{', '.join(readers(name))}")
        resolved[name] = OPTIONS[name].check(name, value)
    if sampler in _SOLVERS:
        check_choice("solver", resolved["solver"], _SOLVERS[sampler])
    if resolved.get("sigma_min") is not None and resolved.get("sigma_max") is not None \
            and not resolved["sigma_min"] < resolved["sigma_max"]:
        raise ValueError(f"sigma_min must be smaller than sigma_max, got {resolved['sigma_min']} and "
                         f"{resolved['sigma_max']}")
    if "sde" in resolved:
        _sde(resolved)  # sigma_min / sigma_max only with sde="ve"
    return Sampler(sampler, steps, tuple(resolved.items()))
