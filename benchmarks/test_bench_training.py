"""The loss part of a DDPM training step (L_simple): draw t and the noise, noise the data, the loss and
its backward. diffkern's training_loss (fused q_sample, fused loss whose forward and backward draw the
noise again) against the same step in eager PyTorch (torch.randint, torch.randn, the q_sample formula,
mse_loss, backward) and under torch.compile; with the model excluded (its output a fixed tensor that
requires grad) and with a tiny MLP. A copy of the bytes the fused pair must move gives the scale.

Besides the time, each row records the bytes autograd keeps between forward and backward beyond the
caller's own tensors (``kept_for_backward``): the fused loss keeps its [B, 4] coefficient rows, the eager
step the noise (and both whatever the model keeps).
"""
import pytest
import torch
from bench_common import DEVICES, run

import diffkern as dk
from diffkern.training import DDPMObjective

SHAPES = [(4096, 2), (4096, 64), (64, 3, 32, 32), (16, 4, 64, 64)]
CASES = [(d, s) for d in DEVICES for s in SHAPES]
IMPLS = ["diffkern", "eager", "torch.compile", "copy"]
MODELS = ["model excluded", "tiny MLP"]


class TinyMLP(torch.nn.Module):
    """x [B, ...] -> [B, ...]: the flattened sample through a 32-wide hidden layer with the time added."""

    def __init__(self, features: int, hidden: int = 32):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(features, hidden), torch.nn.Linear(hidden, features)

    def forward(self, x, t):
        h = self.inp(x.reshape(x.shape[0], -1)) + (t.to(x.dtype) / 1000).reshape(-1, 1)
        return self.out(torch.nn.functional.silu(h)).reshape(x.shape)


def eager_loss(model, x0, alphas_cumprod):
    """The step as one writes it in PyTorch (diffusers' train_unconditional): returns the loss and x_t."""
    t = torch.randint(0, alphas_cumprod.shape[0], (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    abar = alphas_cumprod[t].reshape(shape)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return torch.nn.functional.mse_loss(model(x_t, t), noise), x_t


_compiled = {}


def kept_bytes(fn, held) -> int:
    """Bytes of the distinct tensors autograd keeps for fn's backward that the caller does not hold
    anyway (``held``: the data, the model's parameters or output): what the graph adds to memory."""
    seen, mine = {}, {t.data_ptr() for t in held}

    def pack(tensor):
        if tensor.data_ptr() not in mine:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def label(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("device,shape", CASES, ids=[f"{d}-{label(s)}" for d, s in CASES])
@pytest.mark.parametrize("model_kind", MODELS)
@pytest.mark.parametrize("impl", IMPLS)
def test_training_loss_step(benchmark, device, shape, model_kind, impl):
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, device=device, generator=gen)
    features = x0[0].numel()
    if model_kind == "model excluded":
        output = torch.randn(shape, device=device, generator=gen).requires_grad_(True)
        parameters = [output]

        def model(x, t):
            return output
    else:
        model = TinyMLP(features).to(device)
        parameters = list(model.parameters())
    objective = DDPMObjective()
    alphas_cumprod = dk.DDPMSchedule().alphas_cumprod.to(device=device, dtype=torch.float32)

    if impl == "diffkern":
        def loss():
            return dk.training_loss(model, x0, objective, seed=0, step=1)
    elif impl == "eager":
        def loss():
            return eager_loss(model, x0, alphas_cumprod)[0]
    elif impl == "torch.compile":
        key = (device, shape, model_kind)
        if key not in _compiled:
            _compiled[key] = torch.compile(eager_loss)
        compiled = _compiled[key]

        def loss():
            return compiled(model, x0, alphas_cumprod)[0]
    else:
        src = torch.randn(3 * x0.numel(), device=device, generator=gen)
        dst = torch.empty_like(src)

    if impl == "copy":
        def fn():
            dst.copy_(src)
    else:
        def fn():
            for p in parameters:
                p.grad = None
            loss().backward()
        benchmark.extra_info["kept_for_backward"] = kept_bytes(loss, [x0, *parameters])
    # bytes a fused pair must move: q_sample reads x0 and writes x_t; the loss reads x0 and the output;
    # its backward reads them again and writes the output's gradient
    nbytes = 6 * x0.numel() * x0.element_size()
    run(benchmark, fn, group=f"training loss + backward, {model_kind}, float32 {label(shape)} on {device}",
        name=impl, nbytes=nbytes, device=device)
