"""No host read inside a sampling loop: the CPU form of running every loop under
torch.cuda.set_sync_debug_mode("error"). A dispatch mode records every op that hands a tensor's value
to Python (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``: aten._local_scalar_dense; and the
data-dependent ``nonzero``, ``masked_select``, ``equal``, ``unique``), armed by the first model call:
what a sampler reads to build its tables before the loop is allowed, anything from then on is a
sync on a GPU (or a host read of a table that should have been a list). Every registry sampler (the
k-diffusion drop-ins among them) and a loop of every diffusers drop-in scheduler, at two step counts;
on a GPU, the same loops under torch.cuda.set_sync_debug_mode("error") (never run yet: no GPU was lent
to the work that wrote them)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffkern as dk
from diffkern.demo import _model
from diffkern.models import GaussianMixture
from diffkern.sampling import registry

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_consecutive.default,
              aten.unique_dim.default}


class HostReads(TorchDispatchMode):
    """Records host reads once ``armed``: the ops above, and ``Tensor.tolist`` / ``Tensor.numpy``, which
    read a CPU tensor's memory without dispatching an op (on a GPU they copy to the host first)."""

    def __init__(self):
        super().__init__()
        self.armed, self.reads, self.saved = False, [], {}

    def record(self, what):
        import traceback

        where = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-2]
                 if "/diffkern/" in f.filename or "/diffusers/" in f.filename]
        self.reads.append((what, where[-3:]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed and func in HOST_READS:
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = self.saved[name] = getattr(torch.Tensor, name)

            def reading(tensor, *args, _original=original, _name=name, **kwargs):
                if self.armed:
                    self.record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def armed_by_first_call(model, recorder):
    def wrapped(*args, **kwargs):
        recorder.armed = True
        return model(*args, **kwargs)
    return wrapped


MIXTURE = GaussianMixture.ring()


@pytest.mark.parametrize("name", registry.SAMPLERS)
@pytest.mark.parametrize("steps", [24, 30])
def test_registry_sampler_loop_reads_nothing(name, steps):
    entry = registry.ENTRIES[name]
    options = {"langevin_steps": 2} if name == "langevin" else {}
    sampler = registry.make_sampler(name, steps=steps, **options)
    reference = MIXTURE.sample(64, seed=1, dtype=torch.float64) if entry.model == "field" else None
    recorder = HostReads()
    model = armed_by_first_call(_model(entry.model, MIXTURE, reference), recorder)
    with recorder:
        sampler(model, (8, 2), seed=0)
    reads = recorder.reads
    if entry.model == "field":
        # PFGM checks the field's z part once, after the loop (a zero or sign-changing E_z is refused
        # rather than returned as nan): one read per run, whatever the steps
        assert len(reads) == 1 and reads[0][0] == "aten._local_scalar_dense.default", reads
        reads = []
    assert recorder.armed and not reads, reads[:5]


DROP_INS = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "LCMScheduler",
            "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.parametrize("name", DROP_INS)
def test_drop_in_step_loop_reads_nothing(name):
    pytest.importorskip("diffusers")
    import diffkern.diffusers as D

    scheduler = getattr(D, name)()
    scheduler.set_timesteps(12)
    flow = name.startswith("FlowMatch")
    epsilon = MIXTURE.epsilon_model(dk.DDPMSchedule())
    x = dk.randn((8, 2), seed=0) * (1.0 if flow else float(scheduler.init_noise_sigma))
    recorder = HostReads()
    with recorder:
        for t in scheduler.timesteps:
            recorder.armed = True
            model_input = x if flow else scheduler.scale_model_input(x, t)
            out = MIXTURE.velocity(model_input, t / 1000) if flow else epsilon(model_input, t.expand(8))
            x = scheduler.step(out, t, x).prev_sample
    assert not recorder.reads, recorder.reads[:5]
    assert torch.isfinite(x).all()


def test_the_recorder_sees_a_host_read():
    """The test above could pass by recording nothing: a loop that reads a value is caught."""
    recorder, tolist = HostReads(), torch.Tensor.tolist
    x = torch.ones(3)
    with recorder:
        recorder.armed = True
        if x.sum() > 0:  # a Python branch on a tensor's value
            x = x * 2
        x.tolist()
        float(x[0])
    assert [what for what, _ in recorder.reads] == ["aten._local_scalar_dense.default", "Tensor.tolist",
                                                     "aten._local_scalar_dense.default"]
    assert torch.Tensor.tolist is tolist  # restored on exit


# ---- on a GPU: the same loops under torch.cuda.set_sync_debug_mode("error") ----------------------------

CUDA = torch.cuda.is_available() and dk.cuda_kernels_available()


class SyncErrors:
    """torch.cuda.set_sync_debug_mode("error") from ``arm()`` (the first model call) to the exit."""

    def __init__(self):
        self.armed = False

    def arm(self):
        if not self.armed:
            torch.cuda.set_sync_debug_mode("error")
            self.armed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return False


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and diffkern's CUDA kernels")
@pytest.mark.parametrize("name", [n for n in registry.SAMPLERS if registry.ENTRIES[n].model != "field"])
def test_registry_sampler_loop_does_not_sync_the_gpu(name):
    """A model of plain device ops (x * 0.5 has every kind's shape), so any sync is the sampler's."""
    sampler = registry.make_sampler(name, steps=24, **({"langevin_steps": 2} if name == "langevin" else {}))
    guard = SyncErrors()

    def model(x, level, *args, **kwargs):
        guard.arm()
        return x * 0.5

    with guard:
        x = sampler(model, (8, 2), seed=0, device="cuda")
    assert guard.armed and x.device.type == "cuda"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and diffkern's CUDA kernels")
@pytest.mark.parametrize("name", DROP_INS)
def test_drop_in_step_loop_does_not_sync_the_gpu(name):
    pytest.importorskip("diffusers")
    import diffkern.diffusers as D

    scheduler = getattr(D, name)()
    scheduler.set_timesteps(12, device="cuda")
    flow = name.startswith("FlowMatch")
    x = dk.randn((8, 2), seed=0, device="cuda") * (1.0 if flow else float(scheduler.init_noise_sigma))
    with SyncErrors() as guard:
        for t in scheduler.timesteps:
            guard.arm()
            model_input = x if flow else scheduler.scale_model_input(x, t)
            x = scheduler.step(model_input * 0.1, t, x).prev_sample
    assert x.device.type == "cuda"
