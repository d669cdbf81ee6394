"""Samplers: each a short loop of model calls and fused steps, one module per family.

- ``ddpm``: DDPM and DDIM on a DDPMSchedule, with classifier-free and classifier guidance;
- ``karras``: Euler, Heun and Euler-ancestral on EDM / k-diffusion noise levels;
- ``score_sde``: Euler-Maruyama, score_sde's predictor-corrector sampler, annealed Langevin;
- ``ode``: the probability-flow ODE (fixed Euler / Heun, adaptive dopri5 / bosh3);
- ``dpmpp``: DPM-Solver++ (1-3M, ODE and SDE); ``flow``: flow matching; ``pfgm``: Poisson flow.

They share one run engine (``_engine``), one callback record (``diffkern.StepInfo``) and one
registry (``registry``: name, function, model, default steps, options). ``capture`` compiles a
whole run once as one graph (a CUDA graph on a GPU) and replays it for any seed.
"""
from .capture import CapturedSampler, capture
from .ddpm import classifier_grad, sample_ddim, sample_ddpm
from .dpmpp import sample_dpmpp
from .flow import sample_flow
from .karras import sample_euler, sample_euler_ancestral, sample_heun
from .ode import sample_ode
from .pfgm import pfgm_forward, pfgm_prior, sample_pfgm
from .score_sde import sample_euler_maruyama, sample_langevin, sample_pc

__all__ = ["CapturedSampler", "capture", "classifier_grad", "pfgm_forward", "pfgm_prior", "sample_ddim", "sample_ddpm",
           "sample_dpmpp", "sample_euler", "sample_euler_ancestral", "sample_euler_maruyama", "sample_flow",
           "sample_heun", "sample_langevin", "sample_ode", "sample_pc", "sample_pfgm"]
