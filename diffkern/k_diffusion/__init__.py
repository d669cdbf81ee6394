"""Drop-ins for ``k_diffusion.sampling``: the same function names, signatures, defaults, model
convention (``model(x, sigma * s_in, **extra_args)`` returns the denoised x), callback dicts
(``{x, i, sigma, sigma_hat, denoised}``) and return values, with every step's update one fused launch
(``ops.linear_step``) whose coefficients were computed before the loop::

    import diffkern.k_diffusion as K          # instead of: import k_diffusion.sampling as K
    x0 = K.sample_dpmpp_2m(denoiser, x, sigmas, extra_args={"cond": c}, callback=cb, disable=False)

Noise, three ways:

- as k-diffusion: torch's global generator (``torch.randn_like``) in the same order, or the Brownian tree
  its SDE samplers default to, so results equal k-diffusion's under the same ``torch.manual_seed``; a
  given ``noise_sampler`` is called as k-diffusion calls it;
- diffkern's stream: ``seed=`` (and ``sample_offset=`` for a part of a batch), or
  ``noise_sampler=K.stream_noise_sampler(seed)``: drawn inside the kernel, the same on CPU and CUDA and
  for any split of the batch.

k-diffusion itself is not needed (torchsde is, for the Brownian tree). Where a step adds no noise
(``eta=0``, no churn) nothing is drawn from the global generator, where k-diffusion draws and discards:
the samples are the same, the generator's state afterwards is not.

``K.DiscreteEpsDDPMDenoiser`` (k-diffusion's ``external`` wrapper) runs a DDPM epsilon model under them.
"""
from ._run import StreamNoiseSampler, stream_noise_sampler
from .brownian import BatchedBrownianTree, BrownianTreeNoiseSampler
from .dpm_solver import PIDStepSizeController, sample_dpm_adaptive, sample_dpm_fast
from .dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from .euler import sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral, sample_heun
from .external import DiscreteEpsDDPMDenoiser, DiscreteSchedule
from .lms import linear_multistep_coeff, sample_lms
from .schedules import (
    append_zero,
    default_noise_sampler,
    get_ancestral_step,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_polyexponential,
    get_sigmas_vp,
    to_d,
)

__all__ = [
    "BatchedBrownianTree", "BrownianTreeNoiseSampler", "DiscreteEpsDDPMDenoiser", "DiscreteSchedule",
    "PIDStepSizeController", "StreamNoiseSampler", "append_zero",
    "default_noise_sampler", "get_ancestral_step", "get_sigmas_exponential", "get_sigmas_karras",
    "get_sigmas_polyexponential", "get_sigmas_vp", "linear_multistep_coeff", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_dpm_adaptive", "sample_dpm_fast", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms",
    "stream_noise_sampler", "to_d",
]
