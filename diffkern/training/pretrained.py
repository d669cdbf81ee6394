"""The models shipped with diffkern, trained on the 8x8 digits by its own ``train`` command
(``tools/train_digit_models.sh`` remakes them), each a ConvUNet of widths 32 and 64 (304k parameters,
plain PyTorch):

- ``digits-ddpm``: an epsilon-prediction DDPM of the default DDPMSchedule (DDPM, DDIM, the diffusers
  drop-ins; the denoiser samplers through ``denoiser("digits-ddpm")``, k-diffusion's wrapper);
- ``digits-vp``: a score model of the VP SDE (Euler-Maruyama, predictor-corrector, the probability-flow
  ODE and its likelihood);
- ``digits-flow``: a rectified-flow velocity model (flow Euler / Heun);
- ``digits-pfgm``: a Poisson-field model (PFGM's objective; ``dk.sample_pfgm``, Euler / Heun in log z).

A shipped file holds the EMA weights, the training configuration, the exact command line that made it
and the test metrics it scored when exported (``recorded``); ``models/manifest.json`` pins each file's
sha256, checked on every load.

    python tools/export_digit_models.py runs/digits-ddpm runs/digits-vp runs/digits-flow runs/digits-pfgm
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import asdict

import torch

from .._validate import check_choice
from .trainer import TrainConfig, build_network, objective, sampler_model

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "models")
MANIFEST = os.path.join(MODELS_DIR, "manifest.json")
PRETRAINED = ("digits-ddpm", "digits-vp", "digits-flow", "digits-pfgm")
# The PFGM model's prior truncated at about the largest radius its training perturbations reach: PFGM's
# defaults at 64 features move a point by sigma_end |n / sigma_end| (1 + tau)^M, about 0.08 x 5,430 = 430
# (510 for the largest noise norms); the untruncated prior leaves a quarter of the samples far out
PFGM_MAX_RADIUS = 500.0
# what each model's recorded test metrics are measured with: a registry sampler, its steps and options
RECORD_SAMPLERS = {"digits-ddpm": ("ddim", 50, {}), "digits-vp": ("ode", 50, {"solver": "heun"}),
                   "digits-flow": ("flow", 25, {"solver": "heun"}),
                   "digits-pfgm": ("pfgm", 50, {"solver": "euler", "max_radius": PFGM_MAX_RADIUS})}
RECORD_SAMPLES, RECORD_SEED = 500, 0


def path_of(name: str) -> str:
    check_choice("name", name, PRETRAINED)
    return os.path.join(MODELS_DIR, f"{name}.pt")


def manifest() -> dict:
    """{name: {sha256, command, recorded, ...}} of the shipped models."""
    if not os.path.isfile(MANIFEST):
        return {}
    with open(MANIFEST) as f:
        return json.load(f)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_pretrained(name: str, device=None) -> torch.nn.Module:
    """The shipped model ``name`` (one of PRETRAINED) in the convention of its samplers, in eval mode,
    after checking its file against the manifest's sha256."""
    path = path_of(name)
    entry = manifest().get(name)
    if entry is None or not os.path.isfile(path):
        raise ValueError(f"the pretrained model {name!r} is not in this installation ({path}); "
                         "bash tools/train_digit_models.sh makes it")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, not the manifest's {entry['sha256']}: the file was changed "
                         "or damaged")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**state["config"])
    network = build_network(config, state["sample_shape"])
    network.load_state_dict(state["ema"])
    model = sampler_model(network, objective(config)).eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def denoiser(name: str = "digits-ddpm", device=None, quantize: bool = False) -> torch.nn.Module:
    """The DDPM model as a denoiser D(x, sigma) for the EDM family, DPM-Solver++ and the k-diffusion
    drop-ins (k-diffusion's DiscreteEpsDDPMDenoiser; timesteps interpolated unless ``quantize``), and
    the noise range it covers: (denoiser, sigma_min, sigma_max)."""
    from ..k_diffusion import DiscreteEpsDDPMDenoiser
    from ..schedules import DDPMSchedule

    model = load_pretrained(name, device)
    if model.diffkern_trained.get("kind") != "epsilon":
        raise ValueError(f"name: {name!r} is not a DDPM epsilon model")
    wrapped = DiscreteEpsDDPMDenoiser(model, DDPMSchedule().alphas_cumprod.to(torch.float64), quantize)
    wrapped = wrapped.to(device) if device is not None else wrapped
    return wrapped, float(wrapped.sigma_min), float(wrapped.sigma_max)


def command_of(config: TrainConfig) -> str:
    """The ``python -m diffkern train`` command line of ``config`` (without --out)."""
    words = ["python", "-m", "diffkern", "train", "--data", config.data, "--objective", config.objective]
    if config.objective_options:
        words += ["--objective-options", json.dumps(config.objective_options)]
    words += ["--model", config.model]
    if config.model_kwargs:
        words += ["--model-kwargs", json.dumps(config.model_kwargs)]
    words += ["--steps", str(config.steps), "--batch-size", str(config.batch_size), "--accumulation",
              str(config.accumulation), "--lr", repr(config.lr), "--weight-decay", repr(config.weight_decay),
              "--ema-decay", repr(config.ema_decay), "--seed", str(config.seed)]
    return shlex.join(words)


def recorded_metrics(model, name: str, samples: int = RECORD_SAMPLES) -> dict:
    """The test metrics (diffkern.training.digit_metrics) of ``samples`` samples of ``model`` by its
    record sampler (RECORD_SAMPLERS), seed RECORD_SEED, on the CPU in float32."""
    from ..sampling import registry
    from .digit_metrics import metrics

    sampler_name, steps, options = RECORD_SAMPLERS[name]
    sampler = registry.make_sampler(sampler_name, steps=steps, **options)
    with torch.no_grad():
        x = sampler(model, (samples, 1, 8, 8), seed=RECORD_SEED).clamp(-1, 1)
    scores = metrics(x)
    return {"sampler": sampler.config(), "samples": samples, "seed": RECORD_SEED,
            **{k: scores[k] for k in ("fd", "coverage_tv", "precision", "recall", "nearest_train")}}


def export(run: str, name: str) -> dict:
    """Writes the EMA weights of the train run in folder ``run`` as the shipped model ``name`` and its
    manifest entry (sha256, command line, recorded metrics)."""
    state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    config = TrainConfig(**state["config"])
    if state["step"] != config.steps:
        raise ValueError(f"{run} stopped at step {state['step']} of {config.steps}; finish its training first")
    os.makedirs(MODELS_DIR, exist_ok=True)
    path = path_of(name)
    torch.save({"config": asdict(config), "sample_shape": tuple(state["sample_shape"]), "ema": state["ema"],
                "command": command_of(config), "diffkern": state.get("diffkern")}, path)
    entries = manifest()
    entries[name] = {"file": os.path.basename(path), "sha256": _sha256(path), "command": command_of(config),
                     "final_loss": state["history"][-1]["loss"], "bytes": os.path.getsize(path)}
    with open(MANIFEST, "w") as f:  # first the sha256, which load_pretrained below checks
        json.dump(entries, f, indent=1)
    entries[name]["recorded"] = recorded_metrics(load_pretrained(name), name)
    with open(MANIFEST, "w") as f:
        json.dump(entries, f, indent=1)
    return entries[name]


def main(argv) -> int:
    """tools/export_digit_models.py RUN_FOLDER...: each runs/digits-NAME exported as NAME."""
    if not argv:
        print("usage: python tools/export_digit_models.py RUN_FOLDER... (each runs/digits-NAME)", file=sys.stderr)
        return 2
    for run in argv:
        name = os.path.basename(os.path.normpath(run))
        entry = export(run, name)
        print(f"{name}: {entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256'][:16]}..., recorded {entry['recorded']}")
    return 0

