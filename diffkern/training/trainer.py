"""The ``train`` command's loop: a model trained on a dataset with one of diffkern's objectives, alone
or under torchrun (DistributedDataParallel: gloo on CPU, NCCL on GPU), AdamW, an EMA of the weights,
gradient accumulation, a progress bar with the loss, a loss curve, and checkpoints written atomically
and resumed after a kill.

Reproducibility: step s's global batch is samples [0, batch_size) of (seed, s): sample i takes the
dataset row at position s batch_size + i of an epoch permutation drawn from (seed, epoch), and its
time, noise and dropout come from diffkern's stream at (seed, s, i). Ranks and micro-batches take
contiguous parts of that batch with their sample_offset, so every per-sample quantity is the same for
any world size and accumulation split (the summed gradients then differ only by the order of the
additions).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .._model import progress as progress_bar
from .._validate import check_positive, check_positive_int, check_real
from .._version import __version__
from ..schedules import DDPMSchedule
from ..sde import VESDE, VPSDE, SubVPSDE
from . import cnf_report
from .data import BUILTIN, load_dataset
from .loss import training_loss
from .models import (
    ConcatSquashMLP,
    ConvUNet,
    DividedByStd,
    EDMPrecond,
    FieldHead,
    GeometricLevels,
    NoiseLevelLabels,
    TimeMLP,
    TimeScaled,
    unet,
)
from .objectives import make_objective

CHECKPOINT = "checkpoint.pt"
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def time_scale(objective_) -> float:
    """The factor between the time an objective gives the model and what a sinusoidal embedding expects
    (hundreds): a DDPM timestep or a discrete label is already that; a flow or SDE time in [0, 1] and
    EDM's c_noise (about [-1.5, 1.5]) are not."""
    if objective_.name == "ddpm" or getattr(objective_, "continuous", True) is False:
        return 1.0
    return 250.0 if objective_.name == "edm" else 1000.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that identifies a training run (its checkpoint refuses another configuration)."""

    data: str
    objective: str = "ddpm"
    objective_options: dict = field(default_factory=dict)
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 256
    accumulation: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    data_sha256: str = ""

    def checked(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "accumulation"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.data, str):
            raise ValueError(f"data must be a built-in set's name ({', '.join(BUILTIN)}) or a file's path, got "
                             f"{type(self.data).__name__}")
        for name in ("objective_options", "model_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        check_positive("lr", self.lr)
        if check_real("weight_decay", self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        decay = check_real("ema_decay", self.ema_decay)
        if decay >= 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
        objective(self)  # checks the objective and its options
        return self


def objective(config: TrainConfig):
    """The config's Objective. Its options are JSON: ``sde`` is a name (vp, subvp, ve: each with the
    defaults generate's score samplers use), and what would leave the samplers' conventions (another
    DDPM schedule, another discrete chain) is refused rather than trained into a model that samples wrong."""
    options = dict(config.objective_options)
    if "schedule" in options:
        raise ValueError("objective option schedule: the train command trains on the default DDPMSchedule, the one "
                         "generate's ddpm and ddim samplers use (dk.training_loss takes any)")
    if "sde" in options:
        if options["sde"] not in SDES:
            raise ValueError(f"objective option sde must be one of {tuple(SDES)}, got {options['sde']!r}")
        options["sde"] = SDES[options["sde"]]()
    made = make_objective(config.objective, **options)
    if made.name == "score_matching" and not made.continuous and isinstance(made.sde, VPSDE) \
            and made.num_scales != DDPMSchedule().num_train_timesteps:
        raise ValueError(f"objective option num_scales={made.num_scales}: score_sde's discrete VP chain is "
                         f"generate's DDPMSchedule only with {DDPMSchedule().num_train_timesteps} scales")
    return made


def trained_for(objective_) -> dict:
    """What a model trained with ``objective_`` is, for the samplers: its kind (a key of
    diffkern.sampling.registry.MODELS) and the sampler options it needs."""
    name = objective_.name
    if name == "ddpm":
        return {"kind": "epsilon", "objective": name, "options": {"prediction_type": objective_.prediction_type}}
    if name == "edm":
        return {"kind": "denoiser", "objective": name, "options": {}}
    if name == "flow_matching":
        return {"kind": "velocity", "objective": name, "options": {}}
    if name == "pfgm":
        return {"kind": "field", "objective": name, "options": {}}
    if name == "cnf":
        return {"kind": "cnf", "objective": name, "options": {"t1": objective_.t1}}
    sde = next(key for key, cls in SDES.items() if type(objective_.sde) is cls)
    if objective_.continuous:
        return {"kind": "score", "objective": name, "options": {"sde": sde, "parameterization": "score"}}
    if sde == "vp":  # score_sde's discrete DDPM: an epsilon model of the default DDPMSchedule
        return {"kind": "epsilon", "objective": name, "options": {"prediction_type": "epsilon"}}
    return {"kind": "noise_level_score", "objective": name, "options": {}}


def build_network(config: TrainConfig, sample_shape) -> torch.nn.Module:
    """The network of ``config.model`` ("mlp", "unet", "convunet" or MODULE:ATTR of a factory called with
    model_kwargs and the sample shape as sample_shape=...), taking the objective's native time."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every rerun
    kwargs = dict(config.model_kwargs)
    field = config.objective == "pfgm"  # a Poisson field: one output more, and the z part
    try:
        if config.model == "mlp" and config.objective == "cnf":  # FFJORD's dynamics, native time in [0, t1]
            return ConcatSquashMLP(math.prod(sample_shape), **kwargs)
        if config.model == "mlp":  # a field MLP takes radial coordinates (FieldHead): one input more
            features = math.prod(sample_shape)
            net = TimeMLP(features + 1, out_features=features + 1, **kwargs) if field else TimeMLP(features, **kwargs)
        elif config.model == "unet":
            net = unet(sample_shape, **kwargs, **({"extra_channels": 1} if field else {}))
        elif config.model == "convunet":
            net = ConvUNet(sample_shape, **kwargs, **({"extra_channels": 1} if field else {}))
        elif ":" in config.model:
            net = _factory(config.model)(sample_shape=tuple(sample_shape), **kwargs)
        else:
            raise ValueError(f"model must be mlp, unet, convunet or MODULE:ATTR, got {config.model!r}")
    except (TypeError, RuntimeError) as error:  # e.g. an unknown keyword in model_kwargs
        raise ValueError(f"model {config.model!r} with model_kwargs {kwargs}: {error}") from None
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"model {config.model!r} is a {type(net).__name__}, not a torch.nn.Module")
    objective_ = objective(config)
    if field:
        return FieldHead(net, radial=config.model == "mlp") if config.model in ("mlp", "unet", "convunet") else net
    if config.objective == "cnf":
        return net
    network = TimeScaled(net, time_scale(objective_))
    if trained_for(objective_)["kind"] in ("score", "noise_level_score"):
        network = DividedByStd(network, _std_of(objective_))
    return network


def _std_of(objective_):
    """The noise std at the time a score model of ``objective_`` is given."""
    if objective_.continuous:
        return objective_.sde.marginal_std
    return _levels_of(objective_).sigma


def _levels_of(objective_) -> GeometricLevels:
    sde = objective_.sde
    return GeometricLevels(sde.sigma_min, sde.sigma_max, objective_.num_scales)


def _factory(spec: str):
    import importlib

    module_name, attr = spec.split(":", 1)
    try:
        factory = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (any import failure is the user's spec)
        raise ValueError(f"model {spec}: cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {spec}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model {spec} is a {type(factory).__name__}, not a factory")
    return factory


def sampler_model(network: torch.nn.Module, objective_) -> torch.nn.Module:
    """The trained network in the convention of the samplers that take its kind (itself, EDM's denoiser
    around it, or a score of sigma for discrete noise-level labels), recording what it was trained for
    (``diffkern_trained``: generate and evaluate refuse a sampler it does not fit)."""
    model = network
    if objective_.name == "edm":
        model = EDMPrecond(network, objective_.sigma_data)
    elif trained_for(objective_)["kind"] == "noise_level_score":
        model = NoiseLevelLabels(network, _levels_of(objective_))
    model.diffkern_trained = trained_for(objective_)
    return model


def load_checkpoint(path: str, ema: bool = True, device=None):
    """The model of a ``train`` checkpoint (its EMA weights unless ema=False), ready for dk.sample_* and
    for ``generate`` / ``evaluate`` (``--model diffkern.training:load_checkpoint --model-kwargs
    '{"path": "RUN/checkpoint.pt"}'``): a DDPM objective's model(x, t), a score model, EDM's denoiser
    D(x, sigma), or a flow's velocity(x, t), in eval mode."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**state["config"])
    network = build_network(config, state["sample_shape"])
    network.load_state_dict(state["ema" if ema else "model"])
    model = sampler_model(network, objective(config)).eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def _atomic_save(path: str, value) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Group:
    def __init__(self):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    def barrier(self):
        if self.dist is not None:
            self.dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist is not None:
            value = value.clone()
            self.dist.all_reduce(value)
            value /= self.world
        return value


class _Epochs:
    """Dataset rows by position in the stream of epochs: position p is row perm_e[p mod N] of epoch
    e = p // N, each permutation drawn from (seed, e) alone."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed, self.cache = rows, seed, {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self.cache:
            if len(self.cache) > 4:
                self.cache.pop(min(self.cache))
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self.cache[epoch] = torch.randperm(self.rows, generator=generator)
        return self.cache[epoch]

    def rows_at(self, first: int, count: int) -> torch.Tensor:
        positions = torch.arange(first, first + count)
        epochs, within = positions // self.rows, positions % self.rows
        return torch.stack([self.permutation(int(e))[int(i)] for e, i in zip(epochs, within)])


def _check_folder(out: str, config: TrainConfig) -> Optional[dict]:
    """The checkpoint to resume from (None for a new run), after refusing another configuration's
    folder; nothing is written here."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".probe-{os.getpid()}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"out={out!r} is not a writable folder: {error.strerror or error}") from None
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (a checkpoint that does not load is the user's to move)
        raise ValueError(f"{path} does not load ({type(error).__name__}); move it away or use another --out") from None
    # steps may grow: a longer run of the same configuration resumes where the checkpoint stopped
    saved = {k: v for k, v in state.get("config", {}).items() if k != "steps"}
    wanted = {k: v for k, v in asdict(config).items() if k != "steps"}
    if saved != wanted:
        keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{out} holds a checkpoint of another configuration (differs in {', '.join(keys)}); nothing "
                         "was changed. Rerun with the same settings to resume, or use another --out")
    return state


def _plot(history: list, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(steps, [h["loss"] for h in history], lw=0.6, alpha=0.5, label="loss of the step's batch")
    window = max(1, len(history) // 50)
    if len(history) >= window:
        smooth = torch.tensor([h["loss"] for h in history]).unfold(0, window, 1).mean(1)
        ax.plot(steps[window - 1:], smooth.tolist(), lw=1.5, label=f"mean of {window} steps")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    if all(h["loss"] > 0 for h in history):  # a CNF's negative log-likelihood can be negative
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def train(config: TrainConfig, out: str, *, device=None, progress: bool = True, checkpoint_every: int = 500,
          record_steps: int = 0) -> dict:
    """Train as ``config`` says into the folder ``out`` (checkpoint.pt, loss.json, loss.png), resuming
    from its checkpoint when there is one. Under an initialised process group each rank trains its
    share of every batch with DDP. ``record_steps`` > 0 also writes, for the first steps, every
    sample's global index, draws and loss to out/records-rank<r>.pt (for the reproducibility tests).
    Returns the summary of the run."""
    data = load_dataset(config.data)
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    config = TrainConfig(**{**asdict(config), "data_sha256": digest}).checked()
    check_positive_int("checkpoint_every", checkpoint_every)
    if isinstance(record_steps, bool) or not isinstance(record_steps, int) or record_steps < 0:
        raise ValueError(f"record_steps must be an integer >= 0, got {record_steps!r}")
    group = _Group()
    per_rank = config.batch_size // (group.world * config.accumulation)
    if per_rank * group.world * config.accumulation != config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of world size ({group.world}) times "
                         f"accumulation ({config.accumulation})")
    device = torch.device(device) if device is not None else torch.device("cpu")
    objective_ = objective(config)
    network = build_network(config, tuple(data.shape[1:])).to(device)
    _probe(network, objective_, data[:2].to(device), config)
    state = _check_folder(out, config)
    ema = copy.deepcopy(network).requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, history = 0, []
    if state is not None:
        network.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        if start > config.steps:
            raise ValueError(f"{out} holds a checkpoint at step {start}, past steps={config.steps}; nothing was "
                             "changed")
    trained = network
    # a CNF calls its network many times per loss (and, with the adjoint, inside backward): DDP's reducer
    # expects one forward per backward, so its gradients are averaged over the ranks by hand instead
    by_hand = objective_.name == "cnf" and group.world > 1
    if group.world > 1 and not by_hand:
        trained = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    epochs = _Epochs(data.shape[0], config.seed)
    records = []
    started = time.perf_counter()
    bar = progress_bar(range(start, config.steps), progress and group.rank == 0, f"train ({config.objective})")
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=device)
        # PFGM's target is the field of the whole global batch: every micro-batch gets it as its charges
        charges = data[epochs.rows_at(step * config.batch_size, config.batch_size)].to(device) \
            if objective_.name == "pfgm" else None
        for k in range(config.accumulation):
            first = (k * group.world + group.rank) * per_rank  # this micro-batch's global samples
            x0 = data[epochs.rows_at(step * config.batch_size + first, per_rank)].to(device)
            extra = {"charges": charges} if charges is not None else {}
            sync = k == config.accumulation - 1 or group.world == 1
            context = trained.no_sync() if not sync and hasattr(trained, "no_sync") else _nothing()
            with context:
                batch = training_loss(trained, x0, objective_, seed=config.seed, step=step, sample_offset=first,
                                      return_batch=True, **extra)
                (batch.loss / config.accumulation).backward()
            total += batch.per_sample.detach().sum()
            if step < start + record_steps:
                records.append({"step": step, "first": first, "x_t": batch.x_t.detach().cpu(),
                                "per_sample": batch.per_sample.detach().cpu(),
                                "draws": {k: v.cpu() for k, v in batch.levels.draws.items()}})
        if by_hand:
            for p in network.parameters():
                if p.grad is not None:
                    p.grad.copy_(group.mean(p.grad))
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), network.parameters()):
                e.lerp_(p, 1 - config.ema_decay)
        loss = float(group.mean(total / (per_rank * config.accumulation)))
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss became {loss} at step {step}: lower lr (now {config.lr}) or check the data")
        history.append({"step": step, "loss": loss})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)  # drawn at the bar's own rate
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            _save(group, out, config, (network, ema, optimizer), (step + 1, history, tuple(data.shape[1:])))
    if records:
        torch.save(records, os.path.join(out, f"records-rank{group.rank}.pt"))
    summary = {"steps": config.steps, "resumed_from": start, "final_loss": history[-1]["loss"] if history else None,
               "wall_s": time.perf_counter() - started, "world_size": group.world}
    if group.rank == 0:
        if objective_.name == "cnf":  # test NLL beside the data's entropy, and the density beside the data
            summary.update(cnf_report.report(ema, config.data, data.to(device), objective_,
                                             os.path.join(out, "density.png")))
        with open(os.path.join(out, "loss.json"), "w") as f:
            json.dump({"config": asdict(config), "summary": summary, "history": history}, f)
        summary["plot"] = _plot(history, os.path.join(out, "loss.png"))
    group.barrier()
    return summary


def _save(group: _Group, out: str, config: TrainConfig, modules: tuple, progress: tuple) -> None:
    network, ema, optimizer = modules
    step, history, sample_shape = progress
    if group.rank == 0:
        _atomic_save(os.path.join(out, CHECKPOINT), {
            "config": asdict(config), "step": step, "history": history, "sample_shape": sample_shape,
            "model": network.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "model_kind": objective(config).model, "diffkern": __version__})
    group.barrier()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _probe(network, objective_, x0, config: TrainConfig) -> None:
    """One loss on two samples before anything is written: a model that does not fit the data fails here."""
    try:
        with torch.no_grad():
            training_loss(network, x0, objective_, seed=config.seed, step=0)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 (any failure of the user's model on the data)
        raise ValueError(f"the model fails on the data's samples of shape {tuple(x0.shape[1:])}: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
