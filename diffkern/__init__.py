"""diffkern: fused C++/CUDA kernels for the per-step arithmetic of diffusion models.

    import diffkern as dk
    z = dk.randn((16, 3, 64, 64), seed=0, step=0)   # the noise stream every fused op draws from
    x0 = dk.sample_ddpm(model, (16, 3, 32, 32), num_inference_steps=100, seed=0)

Layers (data flows down): this module, the command line (``cli``), ``demo``, ``distributed`` and the
drop-ins (``diffkern.diffusers``) -> ``sampling``, ``likelihood``, ``training`` -> ``ode``, ``coefficients``,
``sde``, ``schedules``, ``steps``, ``noise`` -> ``ops`` -> the compiled kernels (csrc/).
"""
import importlib

from . import coefficients, models, reference
from ._model import StepInfo
from ._version import __version__
from .likelihood import LogLikelihood, cnf_log_likelihood, exact_trace, hutchinson_trace, log_likelihood
from .noise import rademacher, randn, random_bits
from .ops import BUILD as _BUILD
from .ops import cuda_kernels_available
from .sampling import (
    CapturedSampler,
    capture,
    classifier_grad,
    pfgm_forward,
    pfgm_prior,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp,
    sample_euler,
    sample_euler_ancestral,
    sample_euler_maruyama,
    sample_flow,
    sample_heun,
    sample_langevin,
    sample_ode,
    sample_pc,
    sample_pfgm,
)
from .schedules import DDPMSchedule
from .sde import (
    SDE,
    VESDE,
    VPSDE,
    SubVPSDE,
    denoiser_from_score,
    epsilon_from_score,
    karras_sigmas,
    score_from_denoiser,
    score_from_epsilon,
)
from .steps import (
    ddim_step,
    ddpm_step,
    euler_ancestral_step,
    euler_maruyama_step,
    euler_step,
    heun_correct,
    heun_step,
    langevin_step,
    q_sample,
    q_sample_with_noise,
)
from .training import TrainingBatch, training_loss

__all__ = [
    "__version__", "build_info", "capture", "CapturedSampler", "classifier_grad", "cnf_log_likelihood",
    "coefficients", "cuda_kernels_available", "ddim_step", "ddpm_step", "DDPMSchedule", "denoiser_from_score",
    "epsilon_from_score", "euler_ancestral_step", "euler_maruyama_step", "euler_step", "exact_trace",
    "heun_correct", "heun_step", "hutchinson_trace", "karras_sigmas", "langevin_step", "log_likelihood",
    "LogLikelihood", "models", "pfgm_forward", "pfgm_prior", "q_sample", "q_sample_with_noise", "rademacher",
    "randn", "random_bits", "reference", "sample_ddim", "sample_ddpm", "sample_dpmpp", "sample_euler",
    "sample_euler_ancestral", "sample_euler_maruyama", "sample_flow", "sample_heun", "sample_langevin",
    "sample_ode", "sample_pc", "sample_pfgm", "score_from_denoiser", "score_from_epsilon", "SDE", "StepInfo",
    "SubVPSDE", "training_loss", "TrainingBatch", "VESDE", "VPSDE"
]

# Submodules reachable as attributes without an explicit import (``import diffkern; diffkern.diffusers``);
# the optional integrations import their peer only then, and say how to install it when it is missing.
_LAZY = ("diffusers", "distributed", "demo", "cli", "sampling", "likelihood", "ode", "ops", "steps", "noise", "sde",
         "schedules", "training", "k_diffusion")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """What this installation was built with and can run: versions, compiled kernels, devices."""
    import torch

    return {
        "diffkern": __version__,
        "torch": torch.__version__,
        "built_against_torch": _BUILD["torch_version"],
        "cpu_kernels": True,
        "cpu_isa": _BUILD["cpu_isa"],
        "cuda_kernels": _BUILD["cuda_kernels"],
        "cuda_arch_list": _BUILD["cuda_arch_list"],
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
