"""Autograd through the fused ops: the backward of each fused step is itself one fused pass with the
same coefficients (csrc/include/diffkern/step_backward.h), so gradients flow through single steps,
q_sample and whole sampling loops. Checked three ways: torch.autograd.gradcheck (finite differences,
float64), against autograd through the pure-PyTorch reference (diffkern.reference, float64, so the
only difference is rounding), and torch.library.opcheck's autograd registration tests."""
import pytest
import torch
from common import DEVICES
from test_fused_step import ROWS, VARIANTS, make_inputs, per_sample_rows, table_for

import diffkern as dk
from diffkern import ops, reference

SMALL = (3, 2, 5)  # 10 features per sample: a tail block of 2
NAMES = ("model_output", "model_output_uncond", "guidance_grad", "predicted_variance", "noise")


def _inputs(variant, noise, device, seed=0):
    x, kwargs = make_inputs(variant, torch.float64, device, shape=SMALL, seed=seed)
    if noise == "tensor":
        kwargs["noise"] = torch.randn(SMALL, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device)
    return x, kwargs


def _options(noise, clip, aux, rows_kind, device):
    table = table_for(torch.float64, device)
    options = dict(coefficients=table, clip=clip, aux=aux, stream_noise=noise == "stream", seed=4, step=2)
    if rows_kind == "per_sample":
        options["rows"] = per_sample_rows(SMALL[0], device)
    else:
        options["row"] = 3  # a learned-variance row with a clip range
    return options


def _outputs(fn, x, kwargs, options):
    out, aux_out = fn(x, **kwargs, **options)
    return (out,) if aux_out is None else (out, aux_out)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("noise", ["none", "tensor", "stream"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("aux", ["none", "x0", "noise"])
def test_gradcheck_fused_step(variant, noise, clip, aux):
    """Finite differences against the backward kernel for every input, option and output. x is kept
    away from the clip boundary's kinks by the random inputs (gradcheck perturbs by 1e-6)."""
    x, kwargs = _inputs(variant, noise, "cpu")
    options = _options(noise, clip, aux, "per_sample", "cpu")
    names = ["x"] + list(kwargs)
    leaves = [t.clone().requires_grad_(True) for t in [x, *kwargs.values()]]

    def fn(*tensors):
        return _outputs(ops.fused_step, tensors[0], dict(zip(names[1:], tensors[1:])), options)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("noise", ["tensor", "stream"])
@pytest.mark.parametrize("rows_kind", ["per_sample", "one_row"])
def test_gradients_equal_autograd_through_the_reference(device, variant, noise, rows_kind):
    """The backward kernel against autograd through diffkern.reference.fused_step (float64): the same
    gradients to rounding (1e-12), for each input and both outputs (out and x0). With stream noise the
    gradient of the variance output is proportional to the noise, whose reference transform agrees
    with the kernel's to NORMAL_ATOL / NORMAL_RTOL (float32 log / sin / cos), so that is the tolerance."""
    x, kwargs = _inputs(variant, noise, device, seed=1)
    options = _options(noise, True, "x0", rows_kind, device)
    weights = [torch.randn(SMALL, dtype=torch.float64, generator=torch.Generator().manual_seed(k)).to(device)
               for k in (11, 12)]
    grads = []
    for fn in (ops.fused_step, reference.fused_step):
        leaves = {name: t.clone().requires_grad_(True) for name, t in [("x", x), *kwargs.items()]}
        out, x0 = fn(leaves["x"], **{k: v for k, v in leaves.items() if k != "x"}, **options)
        ((out * weights[0]).sum() + (x0 * weights[1]).sum()).backward()
        grads.append({name: leaf.grad for name, leaf in leaves.items()})
    for name in grads[0]:
        loose = noise == "stream" and name == "predicted_variance"
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name,
                                   rtol=reference.NORMAL_RTOL if loose else 1e-12,
                                   atol=reference.NORMAL_ATOL if loose else 1e-12)


def test_float32_gradients_match_the_float64_ones():
    x, kwargs = _inputs("all", "tensor", "cpu")
    options = _options("tensor", True, "none", "per_sample", "cpu")
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = {name: t.to(dtype).detach().requires_grad_(True) for name, t in [("x", x), *kwargs.items()]}
        options["coefficients"] = table_for(dtype, "cpu")
        out, _ = ops.fused_step(leaves["x"], **{k: v for k, v in leaves.items() if k != "x"}, **options)
        out.sum().backward()
        grads[dtype] = leaves
    for name in grads[torch.float64]:
        torch.testing.assert_close(grads[torch.float32][name].grad.double(), grads[torch.float64][name].grad,
                                   rtol=1e-5, atol=1e-5)


def test_clip_mask_zeroes_the_x0_path():
    """Where x0 is clipped, only the direct terms (d x, f m) carry gradient; inside, the x0 path too."""
    table = torch.zeros(1, len(ROWS[0]), dtype=torch.float64)
    fields = dk.coefficients.INDEX
    table[0, fields["a"]], table[0, fields["c"]], table[0, fields["d"]] = 2.0, 3.0, 0.5
    table[0, fields["clip_lo"]], table[0, fields["clip_hi"]] = -1.0, 1.0
    x = torch.tensor([[-2.0, -0.25, 0.25, 2.0]], dtype=torch.float64, requires_grad=True)
    out, _ = ops.fused_step(x, coefficients=table, clip=True)
    out.sum().backward()
    assert x.grad.tolist() == [[0.5, 6.5, 6.5, 0.5]]


def test_noise_tensor_gradient_and_stream_noise_has_none():
    x, kwargs = _inputs("plain", "tensor", "cpu")
    noise = kwargs.pop("noise").requires_grad_(True)
    out, _ = ops.fused_step(x, **kwargs, noise=noise, coefficients=table_for(torch.float64, "cpu"), row=0)
    out.sum().backward()
    sigma = float(ROWS[0, dk.coefficients.INDEX["sigma"]])
    torch.testing.assert_close(noise.grad, torch.full_like(noise, sigma))


def test_coefficient_table_gradients_are_refused_clearly():
    x, kwargs = _inputs("plain", "none", "cpu")
    table = table_for(torch.float64, "cpu").clone().requires_grad_(True)
    with pytest.raises(ValueError, match="coefficient table"):
        ops.fused_step(x, **kwargs, coefficients=table, row=0)


def test_out_variant_refuses_inputs_that_require_grad():
    x, kwargs = _inputs("plain", "none", "cpu")
    kwargs["model_output"].requires_grad_(True)
    with pytest.raises(ValueError, match="out= cannot record gradients"):
        ops.fused_step(x, **kwargs, coefficients=table_for(torch.float64, "cpu"), row=0, out=torch.empty_like(x))


def test_opcheck_with_autograd():
    x, kwargs = _inputs("all", "tensor", "cpu")
    args = [x.requires_grad_(True)] + [kwargs[name].requires_grad_(True) if name in kwargs else None for name in NAMES]
    table = table_for(torch.float64, "cpu")
    torch.library.opcheck(torch.ops.diffkern.fused_step.default,
                          (*args, table, per_sample_rows(SMALL[0], "cpu"), 0, True, 1, False, 1, 2, 3, 4, None))


# ---- the public steps and whole loops ----

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [None, 1.0])
def test_ddpm_step_gradients(prediction_type, clip_sample):
    sched = dk.DDPMSchedule()
    gen = torch.Generator().manual_seed(3)
    x, m, z = (torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(3))
    m.requires_grad_(True)
    x.requires_grad_(True)

    def step(m, x):
        return dk.ddpm_step(m, 500, x, sched, prediction_type=prediction_type, clip_sample=clip_sample, noise=z)
    assert torch.autograd.gradcheck(step, (m, x))
    step(m, x).sum().backward()
    assert m.grad is not None and bool(m.grad.ne(0).any())


def test_q_sample_and_sde_steps_have_gradients():
    sched, sde = dk.DDPMSchedule(), dk.VPSDE()
    gen = torch.Generator().manual_seed(4)
    x0, z = (torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: dk.q_sample(a, 300, sched, noise=b), (x0, z))
    s = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dk.euler_maruyama_step(a, b, 0.5, -0.01, sde, noise=z.detach()),
                                    (s, x0))
    assert torch.autograd.gradcheck(lambda a, b: dk.langevin_step(a, b, 0.01, noise=z.detach()), (s, x0))


class Affine(torch.nn.Module):
    """eps(x, t) = w x + b with learnable w, b: a model with parameters to fine-tune."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.1, dtype=torch.float64))

    def forward(self, x, t):
        return self.w * x + self.b


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gradients_through_a_whole_sampling_loop(sampler):
    """d(loss)/d(parameters) through every step of a sampler equals autograd through the same loop
    written with the reference step (the reward fine-tuning use: a loss on the samples)."""
    sched, steps, shape = dk.DDPMSchedule(), 8, (16, 3)
    model = Affine()
    run = dk.sample_ddpm if sampler == "ddpm" else dk.sample_ddim
    samples = run(model, shape, sched, num_inference_steps=steps, seed=2, dtype=torch.float64, clip_sample=1.0)
    (samples ** 2).mean().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    timesteps = sched.timesteps(steps)
    x = dk.randn(shape, seed=2, step=0, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        abar = sched.alphas_cumprod_at(torch.tensor([t]))
        abar_prev = sched.alphas_cumprod_at(torch.tensor([prev]))
        rows = (dk.coefficients.ddpm_rows(abar, abar_prev, clip_range=(-1.0, 1.0)) if sampler == "ddpm" else
                dk.coefficients.ddim_rows(abar, abar_prev, clip_range=(-1.0, 1.0)))
        noise = dk.randn(shape, seed=2, step=i + 1, dtype=torch.float64) if sampler == "ddpm" and prev >= 0 else None
        x, _ = reference.fused_step(x, model(x, t), noise=noise, coefficients=rows, clip=True)
    (x ** 2).mean().backward()
    torch.testing.assert_close(samples, x, rtol=1e-12, atol=1e-12)
    for got, expected in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_sampler_without_grad_still_reuses_its_buffers():
    """Without requires_grad the loop keeps writing into its two state buffers (no allocation per step)."""
    seen = set()

    def model(x, t):
        seen.add(x.data_ptr())
        return x * 0.1
    dk.sample_ddim(model, (4, 3), num_inference_steps=6, seed=0)
    assert len(seen) == 3  # x_T and the two buffers it alternates between


# ---- the widened step and the likelihood ops ----

def _linear_table(n, outputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = n + 3 + outputs * (n + 2)
    table = torch.randn(2, width, dtype=torch.float64, generator=gen)
    table[:, n + 1], table[:, n + 2] = -0.6, 0.8  # the clip range
    return table


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("x0", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_gradcheck_linear_step(n, outputs, x0, clip, noise):
    gen = torch.Generator().manual_seed(n + 2 * outputs)
    inputs = [torch.randn(SMALL, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(n)]
    z = torch.randn(SMALL, dtype=torch.float64, generator=gen).requires_grad_(True) if noise else None
    table = _linear_table(n, outputs)

    def fn(*tensors):
        return tuple(ops.linear_step(list(tensors[:n]), tensors[n] if noise else None, coefficients=table, row=1,
                                     outputs=outputs, x0=x0, clip=clip))
    assert torch.autograd.gradcheck(fn, inputs + ([z] if noise else []))


def test_linear_step_gradients_with_stream_noise_match_the_reference():
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(SMALL, dtype=torch.float64, generator=gen) for _ in range(2)]
    table = _linear_table(2, 2, seed=1)
    grads = []
    for fn in (ops.linear_step, reference.linear_step):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outs = fn(leaves, coefficients=table, row=0, outputs=2, x0=True, clip=True, stream_noise=True, seed=3, step=1)
        sum(o.sum() * (k + 1) for k, o in enumerate(outs)).backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_probe_trace_and_likelihood_step():
    gen = torch.Generator().manual_seed(6)
    probes, products = (torch.randn(2, 3, 4, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda p, q: ops.probe_trace(p, q, 0.5), (probes, products))
    x, m, m_prev = (torch.randn(3, 4, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(3))
    delta, trace_prev = (torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(2))

    def step(x, m, m_prev, probes, products, delta, trace_prev):
        return ops.likelihood_step(x, m, m_prev, probes, products, delta, trace_prev, c_x=0.9, c_model=-0.2,
                                   c_prev=0.1, l0=0.3, l_prev=0.25, l_trace=0.75, trace_scale=0.5)
    assert torch.autograd.gradcheck(step, (x, m, m_prev, probes, products, delta, trace_prev))

