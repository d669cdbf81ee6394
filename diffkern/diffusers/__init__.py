"""Drop-in diffusers schedulers whose ``step`` is one launch of diffkern's widened fused step.

    from diffkern.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class subclasses the diffusers class of the same name, so configuration, ``from_config`` /
``from_pretrained`` / ``save_pretrained``, ``set_timesteps``, ``scale_model_input``, ``add_noise`` and
the other helpers are diffusers' own. What changes is the arithmetic of ``step``:

* ``set_timesteps`` builds the coefficient row of every step of the schedule (with diffusers' own
  float32 scalar arithmetic, so results agree with diffusers to float32 rounding; with
  ``exact_coefficients=True`` the training schedule and the rows are float64);
* ``step`` looks up its row by the step index (a host integer) and makes one call of
  ``diffkern.ops.linear_step``, which reads the sample, the model output and any kept history and
  writes the new sample, the x0 prediction and whatever history the solver keeps. It does not
  synchronise with the device, copy to it, or write into its arguments.

Noise: with a ``generator`` (or ``variance_noise``), noise is drawn exactly as diffusers draws it
(``randn_tensor``, same shapes, dtypes, call order and skip rules), so results equal diffusers'.
Without one, it comes from diffkern's stream, keyed by (seed, step index, sample_offset + row): the
same on CPU and CUDA, and for any split of the batch when each part's scheduler is given the global
index of its first row (``sample_offset=`` or ``set_seed(seed, sample_offset)``).

This package is the only part of diffkern that imports diffusers: ``_linear_form`` compiles a step
written as diffusers writes it into a row of the fused step, ``_base`` holds what every drop-in
shares, and each scheduler has its own module.
"""
try:
    import diffusers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError("diffkern.diffusers needs diffusers: pip install diffusers (or pip install "
                      "'diffkern[diffusers]')") from error

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from .euler_discrete import EulerDiscreteScheduler
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from .heun_discrete import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .unipc_multistep import UniPCMultistepScheduler

__all__ = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "FlowMatchEulerDiscreteScheduler", "LCMScheduler"]
