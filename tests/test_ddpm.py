"""DDPM and DDIM: schedules, fused steps against diffusers, samplers against mathematics."""
import math

import pytest
import torch
from common import TOLERANCES
from gaussian import GaussianModel, ddpm_chain_moments

import diffkern as dk

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler
except ImportError:  # pragma: no cover
    diffusers = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is an optional test dependency")
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


# ---- schedules ----

@needs_diffusers
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_betas_match_diffusers(beta_schedule):
    # scaled_linear is latent diffusion's schedule, with its own range
    beta_range = dict(beta_start=8.5e-4, beta_end=0.012) if beta_schedule == "scaled_linear" else {}
    ours = dk.DDPMSchedule(beta_schedule=beta_schedule, **beta_range)
    ref = DDPMScheduler(beta_schedule=beta_schedule, **beta_range)
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    # diffusers keeps float32 tables: agreement to float32 rounding
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-4, atol=1e-7)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [10, 50, 100, 250, 1000])
def test_timesteps_match_diffusers(spacing, n):
    ref = DDPMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert dk.DDPMSchedule(timestep_spacing=spacing).timesteps(n) == ref.timesteps.tolist()


def test_cosine_schedule_is_capped_and_alias():
    cosine = dk.DDPMSchedule(beta_schedule="cosine")
    assert torch.equal(cosine.betas, dk.DDPMSchedule(beta_schedule="squaredcos_cap_v2").betas)
    assert cosine.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(beta_schedule="quadratic"), "beta_schedule"),
    (dict(betas=[0.1, 1.5]), r"\(0, 1\)"),
    (dict(betas=[0.0, 0.1]), r"\(0, 1\)"),
    (dict(beta_start=-0.1), r"\(0, 1\)"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
])
def test_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.DDPMSchedule(**kwargs)


def test_more_inference_steps_than_timesteps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        dk.DDPMSchedule(num_train_timesteps=100).timesteps(101)


# ---- single steps against diffusers, in float64 on the same betas ----

def diffusers_in_float64(scheduler, ours):
    """diffusers' formulas on our float64 tables (its own are float32, ~1e-4 off near t = 0)."""
    scheduler.betas = ours.betas.clone()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = ours.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_inference_steps", [None, 50])
def test_ddpm_step_matches_diffusers(monkeypatch, prediction_type, variance_type, clip, num_inference_steps):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    ours = dk.DDPMSchedule(beta_schedule="squaredcos_cap_v2" if clip else "linear")
    ref = diffusers_in_float64(DDPMScheduler(beta_schedule=ours.beta_schedule, prediction_type=prediction_type,
                                             variance_type=variance_type, clip_sample=clip), ours)
    if num_inference_steps:
        ref.set_timesteps(num_inference_steps)
    timesteps = ours.timesteps(num_inference_steps)
    gen = torch.Generator().manual_seed(1)
    shape, channels = (3, 2, 5, 7), 2
    for i in [0, 1, len(timesteps) // 2, len(timesteps) - 2, len(timesteps) - 1]:
        t = timesteps[i]
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        out_channels = 2 * channels if variance_type == "learned_range" else channels
        m = torch.randn((3, out_channels, 5, 7), generator=gen, dtype=torch.float64)
        m[:, channels:] = m[:, channels:].tanh()
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: z)  # noqa: B023
        expected = ref.step(m, t, x)
        kwargs = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip, prev_t=prev,
                      return_x0=True)
        out32, x0_32 = dk.ddpm_step(m.float(), t, x.float(), ours, noise=z.float(), **kwargs)
        out64, x0_64 = dk.ddpm_step(m, t, x, ours, noise=z, **kwargs)
        assert relative_error(out32, expected.prev_sample) < 1e-5, (t, prev)
        assert relative_error(x0_32, expected.pred_original_sample) < 1e-5, (t, prev)
        assert relative_error(out64, expected.prev_sample) < 1e-10, (t, prev)


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, clip, use_clipped_model_output):
    ours = dk.DDPMSchedule()
    ref = diffusers_in_float64(DDIMScheduler(prediction_type=prediction_type, clip_sample=clip), ours)
    ref.set_timesteps(50)
    timesteps = ours.timesteps(50)
    gen = torch.Generator().manual_seed(2)
    for i in [0, 25, 48, 49]:
        t = timesteps[i]
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, m, z = (torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64) for _ in range(3))
        expected = ref.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped_model_output, variance_noise=z)
        kwargs = dict(eta=eta, prediction_type=prediction_type, clip_sample=clip,
                      use_clipped_model_output=use_clipped_model_output)
        out32 = dk.ddim_step(m.float(), t, prev, x.float(), ours, noise=z.float() if eta > 0 else None, **kwargs)
        out64 = dk.ddim_step(m, t, prev, x, ours, noise=z if eta > 0 else None, **kwargs)
        assert relative_error(out32, expected.prev_sample) < 1e-5, (t, prev)
        assert relative_error(out64, expected.prev_sample) < 1e-10, (t, prev)


def test_ddim_eta_one_is_the_ddpm_posterior():
    sched = dk.DDPMSchedule()
    gen = torch.Generator().manual_seed(3)
    x, m, z = (torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    for t, prev in [(999, 979), (500, 480), (20, 0)]:
        ddim = dk.ddim_step(m, t, prev, x, sched, eta=1.0, noise=z)
        ddpm = dk.ddpm_step(m, t, x, sched, noise=z, prev_t=prev)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_per_sample_timesteps_equal_one_call_per_sample(device, dtype):
    """t as a tensor [B]: sample n equals a single-sample call at t[n] (same noise via sample_offset)."""
    sched = dk.DDPMSchedule()
    gen = torch.Generator().manual_seed(4)
    x, m = (torch.randn(4, 3, 5, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    t = torch.tensor([999, 500, 1, 0], device=device)
    batched = dk.ddpm_step(m, t, x, sched, seed=7, step=3, clip_sample=True)
    strided = dk.ddpm_step(m, t, x, sched, seed=7, step=3, clip_sample=True, prev_t=t - 1)
    assert torch.equal(batched, strided)
    for n in range(4):
        single = dk.ddpm_step(m[n:n + 1], int(t[n]), x[n:n + 1], sched, seed=7, step=3, sample_offset=n,
                              clip_sample=True)
        assert torch.equal(batched[n:n + 1], single), n


def test_in_kernel_noise_is_the_randn_stream():
    sched = dk.DDPMSchedule()
    x, m = torch.randn(6, 4, 9), torch.randn(6, 4, 9)
    z = dk.randn(x.shape, seed=5, step=321, sample_offset=2, stream=3)
    assert torch.equal(dk.ddpm_step(m, 321, x, sched, seed=5, sample_offset=2, stream=3),  # step defaults to t
                       dk.ddpm_step(m, 321, x, sched, noise=z))


def test_last_step_adds_no_noise():
    sched = dk.DDPMSchedule()
    x, m = torch.randn(3, 8), torch.randn(3, 8)
    final, x0 = dk.ddpm_step(m, 0, x, sched, return_x0=True)  # no seed needed
    # x_prev at t = 0 is the posterior mean with abar_prev = 1, i.e. x0 itself
    torch.testing.assert_close(final, x0)


# ---- forward process ----

def test_q_sample_is_the_forward_process():
    sched = dk.DDPMSchedule()
    x0 = torch.randn(16, 3, 8, 8)
    t = torch.randint(0, 1000, (16,))
    x_t, eps = dk.q_sample_with_noise(x0, t, sched, seed=3, step=11)
    abar = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, **TOLERANCES[torch.float32])
    assert torch.equal(eps, dk.randn(x0.shape, seed=3, step=11))
    assert torch.equal(x_t, dk.q_sample(x0, t, sched, seed=3, step=11))
    assert torch.equal(x_t, dk.q_sample(x0, t, sched, noise=eps))


def test_q_sample_statistics():
    sched = dk.DDPMSchedule()
    n = 1 << 16
    x0 = torch.full((n, 1), 2.0)
    x_t = dk.q_sample(x0, 300, sched, seed=1)
    abar = float(sched.alphas_cumprod[300])
    assert abs(x_t.mean().item() - 2 * math.sqrt(abar)) < 5 * math.sqrt((1 - abar) / n)
    assert abs(x_t.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


# ---- samplers against mathematics ----

MU = [0.5, -1.0, 2.0, 0.0]
STD = [0.3, 1.0, 0.5, 2.0]
N_SAMPLES = 8192


def assert_moments(samples, mean, std, mean_allowance=0.0, std_allowance=0.0):
    """Sample moments within 5 standard errors (n = N_SAMPLES) plus a stated allowance."""
    samples = samples.double()
    n = samples.shape[0]
    mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
    mean_err = (samples.mean(0) - mean).abs()
    std_err = (samples.std(0) - std).abs()
    assert (mean_err <= 5 * std / math.sqrt(n) + mean_allowance).all(), (samples.mean(0), mean)
    assert (std_err <= 5 * std / math.sqrt(2 * n) + std_allowance).all(), (samples.std(0), std)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_ddpm_reproduces_gaussian_data(prediction_type):
    sched = dk.DDPMSchedule()
    model = GaussianModel(MU, STD, sched.alphas_cumprod, prediction_type)
    samples = dk.sample_ddpm(model, (N_SAMPLES, 4), sched, seed=0, prediction_type=prediction_type)
    # The exact law of the 1000-step chain (closed form, affine-Gaussian steps) ...
    chain_mean, chain_std = ddpm_chain_moments(MU, STD, sched.alphas_cumprod, sched.timesteps())
    assert_moments(samples, chain_mean, chain_std)
    # ... and the data, with the chain's own discretisation bias (<= 1.3 % of the std) as allowance.
    assert_moments(samples, MU, STD, mean_allowance=(chain_mean - torch.tensor(MU, dtype=torch.float64)).abs(),
                   std_allowance=(chain_std - torch.tensor(STD, dtype=torch.float64)).abs())
    assert model.calls == 1000


def ddim_affine_map(sched, steps, prediction_type="epsilon"):
    """DDIM (eta = 0) with the exact model is affine in x_T: x_0 = A x_T + B, read off two runs."""
    model = GaussianModel(MU, STD, sched.alphas_cumprod, prediction_type)
    kwargs = dict(num_inference_steps=steps, prediction_type=prediction_type, dtype=torch.float64)
    at_zero = dk.sample_ddim(model, (1, 4), sched, x_T=torch.zeros(1, 4, dtype=torch.float64), **kwargs)[0]
    at_one = dk.sample_ddim(model, (1, 4), sched, x_T=torch.ones(1, 4, dtype=torch.float64), **kwargs)[0]
    return at_one - at_zero, at_zero


def test_sample_ddim_converges_to_the_data_law():
    """The probability-flow map sends N(0, 1) to N(mu, s^2); DDIM (first order) gets there with an
    error that shrinks like 1 / steps. Errors in units of each dimension's std."""
    sched = dk.DDPMSchedule()
    std, mu = torch.tensor(STD, dtype=torch.float64), torch.tensor(MU, dtype=torch.float64)
    errors = []
    for steps in (10, 50, 200):
        scale, shift = ddim_affine_map(sched, steps)
        errors.append(max(((scale - std) / std).abs().max().item(), ((shift - mu) / std).abs().max().item()))
    assert errors[0] > errors[1] > errors[2], errors
    assert 3 < errors[1] / errors[2] < 5, errors  # 4x the steps, 4x smaller: order one
    assert errors[1] < 0.1 and errors[2] < 0.03, errors  # measured: 0.36, 0.083, 0.022


def test_sample_ddim_reproduces_gaussian_data():
    sched = dk.DDPMSchedule()
    model = GaussianModel(MU, STD, sched.alphas_cumprod)
    samples = dk.sample_ddim(model, (N_SAMPLES, 4), sched, num_inference_steps=50, seed=1)
    scale, shift = ddim_affine_map(sched, 50)  # the exact law of 50 DDIM steps: N(shift, scale^2)
    assert_moments(samples, shift, scale.abs())
    # the data, allowing the 50-step discretisation error (shown above to shrink with more steps)
    std, mu = torch.tensor(STD, dtype=torch.float64), torch.tensor(MU, dtype=torch.float64)
    assert_moments(samples, MU, STD, mean_allowance=(shift - mu).abs(), std_allowance=(scale.abs() - std).abs())


# ---- guidance ----

class NoisyGaussianClassifier:
    """grad_x log p_t(y | x_t) for x0 ~ N(mu0, s0^2), y = x0 + N(0, r^2): p(x0 | x_t) is Gaussian,
    N(m_t, v_t), so y | x_t ~ N(m_t, v_t + r^2) and the gradient is (y - m_t) / (v_t + r^2) dm_t/dx."""

    def __init__(self, mu0, s0, r, alphas_cumprod):
        self.mu0, self.s0, self.r = mu0, s0, r
        self.alphas_cumprod = alphas_cumprod

    def __call__(self, x, t, y):
        ab = self.alphas_cumprod[t.cpu()].to(x.device).reshape(-1, 1)
        v_t = 1 / (1 / self.s0 ** 2 + ab / (1 - ab))
        m_t = v_t * (self.mu0 / self.s0 ** 2 + ab.sqrt() * x.double() / (1 - ab))
        return ((y - m_t) / (v_t + self.r ** 2) * v_t * ab.sqrt() / (1 - ab)).to(x.dtype)


def test_classifier_guidance_samples_the_posterior():
    sched = dk.DDPMSchedule()
    mu0, s0, r = 0.5, 1.0, 0.5
    y = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    model = GaussianModel([mu0, mu0], [s0, s0], sched.alphas_cumprod)
    classifier = NoisyGaussianClassifier(mu0, s0, r, sched.alphas_cumprod)
    samples = dk.sample_ddpm(model, (N_SAMPLES, 2), sched, seed=2, classifier_grad_fn=classifier, y=y,
                             classifier_scale=1.0)
    post_var = 1 / (1 / s0 ** 2 + 1 / r ** 2)
    post_mean = post_var * (mu0 / s0 ** 2 + y[0] / r ** 2)
    assert_moments(samples, post_mean, [math.sqrt(post_var)] * 2, mean_allowance=0.01, std_allowance=0.01)


def test_classifier_guidance_through_autograd_of_a_classifier():
    """classifier(x, t) -> logits: the sampler's autograd gradient equals the closed form."""
    x = torch.randn(8, 3, dtype=torch.float64)
    t = torch.full((8,), 400)
    weight = torch.randn(5, 3, dtype=torch.float64)

    def classifier(x, t):
        return x @ weight.T

    y = torch.randint(0, 5, (8,))
    grad = dk.classifier_grad(classifier, x, t, y)
    probs = torch.softmax(x @ weight.T, -1)
    torch.testing.assert_close(grad, weight[y] - probs @ weight)


class TwoConditionModel:
    """eps of N(mu_c, 1) data where the condition c in {0, 1} picks mu (the "null" condition is 1)."""

    def __init__(self, alphas_cumprod):
        self.models = [GaussianModel([1.0], [1.0], alphas_cumprod), GaussianModel([-2.0], [1.0], alphas_cumprod)]

    def __call__(self, x, t, cond):
        outs = [model(x, t) for model in self.models]
        return torch.where(cond.reshape(-1, 1) == 0, outs[0], outs[1])


def test_classifier_free_guidance_weights():
    sched = dk.DDPMSchedule()
    model = TwoConditionModel(sched.alphas_cumprod)
    cond, null = torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)
    kwargs = dict(num_inference_steps=50, seed=3)
    conditional = dk.sample_ddpm(model, (64, 1), sched, cond=cond, **kwargs)
    unconditional = dk.sample_ddpm(model, (64, 1), sched, cond=null, **kwargs)
    w1 = dk.sample_ddpm(model, (64, 1), sched, cond=cond, null_cond=null, guidance_scale=1.0, **kwargs)
    w0 = dk.sample_ddpm(model, (64, 1), sched, cond=cond, null_cond=null, guidance_scale=0.0, **kwargs)
    assert torch.equal(w0, unconditional)  # eps_u + 0 (eps_c - eps_u) is eps_u exactly
    torch.testing.assert_close(w1, conditional, atol=1e-5, rtol=1e-5)  # eps_u + (eps_c - eps_u): rounding only
    w3 = dk.sample_ddpm(model, (64, 1), sched, cond=cond, null_cond=null, guidance_scale=3.0, **kwargs)
    assert w3.mean() > conditional.mean() + 1  # pushed further from the null condition's mode


# ---- reproducibility and conventions ----

def test_same_seed_same_samples_and_batch_splits():
    sched = dk.DDPMSchedule()
    model = GaussianModel(MU, STD, sched.alphas_cumprod)
    kwargs = dict(num_inference_steps=20, seed=9)
    whole = dk.sample_ddpm(model, (16, 4), sched, **kwargs)
    assert torch.equal(whole, dk.sample_ddpm(model, (16, 4), sched, **kwargs))
    halves = torch.cat([dk.sample_ddpm(model, (8, 4), sched, **kwargs),
                        dk.sample_ddpm(model, (8, 4), sched, sample_offset=8, **kwargs)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, dk.sample_ddpm(model, (16, 4), sched, num_inference_steps=20, seed=10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sampling(dtype):
    sched = dk.DDPMSchedule()
    model = GaussianModel(MU, STD, sched.alphas_cumprod)
    samples = dk.sample_ddpm(model, (N_SAMPLES, 4), sched, num_inference_steps=100, seed=4, dtype=dtype)
    assert samples.dtype == dtype and torch.isfinite(samples).all()
    reference = dk.sample_ddpm(model, (N_SAMPLES, 4), sched, num_inference_steps=100, seed=4)
    # the same noise: half-precision states follow the float32 run up to their rounding
    assert (samples.double() - reference.double()).abs().mean() < (0.01 if dtype == torch.float16 else 0.05)


def test_callback_and_progress(capsys):
    sched = dk.DDPMSchedule(num_train_timesteps=50)
    model = GaussianModel(MU, STD, sched.alphas_cumprod)
    seen = []
    dk.sample_ddim(model, (4, 4), sched, num_inference_steps=5, progress=True,
                   callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [s[:2] for s in seen] == list(enumerate(sched.timesteps(5)))
    assert "DDIM" in capsys.readouterr().err  # the tqdm bar


@needs_diffusers
def test_diffusers_unet_works_unchanged_and_matches_a_diffusers_loop(monkeypatch):
    """A diffusers UNet2DModel samples with dk.sample_ddpm; the same loop written with diffusers'
    DDPMScheduler (fed diffkern's noise) gives the same images."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    sched = dk.DDPMSchedule()
    shape = (2, 3, 8, 8)
    with torch.no_grad():
        ours = dk.sample_ddpm(unet, shape, sched, num_inference_steps=4, seed=5, clip_sample=True)
        ref = diffusers_in_float64(DDPMScheduler(clip_sample=True), sched)
        ref.set_timesteps(4)
        x = dk.randn(shape, seed=5, step=0)
        for i, t in enumerate(ref.timesteps):
            z = dk.randn(shape, seed=5, step=i + 1)
            monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: z.double())  # noqa: B023
            eps = unet(x, t.expand(2)).sample
            x = ref.step(eps.double(), t, x.double()).prev_sample.float()
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


# ---- bad inputs ----

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(t=1000), ValueError, "outside"),
    (dict(t=-1), ValueError, "outside"),
    (dict(t=torch.tensor([1, 1000, 3])), ValueError, "outside"),
    (dict(t=1.5), TypeError, "int"),
    (dict(prediction_type="score"), ValueError, "prediction_type"),
    (dict(variance_type="learned"), ValueError, "variance_type"),
    (dict(model_output=torch.zeros(3, 4)), ValueError, "shape"),
    (dict(model_output=torch.zeros(3, 5, device="meta")), ValueError, "meta"),
    (dict(seed=None), ValueError, "seed="),
    (dict(noise=torch.zeros(3, 5)), ValueError, "not both"),
    (dict(prev_t=600), ValueError, "smaller"),
    (dict(guidance_scale=2.0), ValueError, "guidance"),
    (dict(clip_sample=-1.0), ValueError, "clip_sample"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, "step="),
])
def test_ddpm_step_bad_inputs(kwargs, error, match):
    args = dict(model_output=torch.zeros(3, 5), t=500, x_t=torch.zeros(3, 5), sched=dk.DDPMSchedule(), seed=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dk.ddpm_step(**args)


def test_sampler_bad_inputs():
    sched = dk.DDPMSchedule(num_train_timesteps=10)
    with pytest.raises(ValueError, match="shape"):
        dk.sample_ddpm(lambda x, t: torch.zeros(2, 2), (3, 4), sched)
    with pytest.raises(ValueError, match="null_cond"):
        dk.sample_ddpm(lambda x, t, c: x, (3, 4), sched, cond=torch.zeros(3), guidance_scale=2.0)
    with pytest.raises(TypeError, match=".sample"):
        dk.sample_ddpm(lambda x, t: "nope", (3, 4), sched)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dk.sample_ddim(lambda x, t: x, (3, 4), sched, num_inference_steps=20)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_stride_is_diffusers_ddim_loop(spacing, eta):
    """prev_timestep="stride" is diffusers' own loop (set_timesteps, then step() at each timestep with
    the same x_T, model and noise), to rounding in float64; the default "next" differs from it where
    t - T // n is not the next listed timestep (linspace at n = 30: by ~1e-2), and agrees for leading."""
    sched = dk.DDPMSchedule(timestep_spacing=spacing)
    model = GaussianModel(MU, STD, sched.alphas_cumprod)
    shape, n = (64, 4), 30
    ref = diffusers_in_float64(DDIMScheduler(timestep_spacing=spacing, clip_sample=False), sched)
    ref.set_timesteps(n)
    x = dk.randn(shape, seed=4, step=0, dtype=torch.float64)
    for i, t in enumerate(ref.timesteps.tolist()):
        z = dk.randn(shape, seed=4, step=i + 1, dtype=torch.float64)
        x = ref.step(model(x, torch.full((64,), t)), t, x, eta=eta, variance_noise=z).prev_sample
    kwargs = dict(num_inference_steps=n, eta=eta, seed=4, dtype=torch.float64)
    stride = dk.sample_ddim(model, shape, sched, prev_timestep="stride", **kwargs)
    torch.testing.assert_close(stride, x, rtol=1e-10, atol=1e-10)
    listed = dk.sample_ddim(model, shape, sched, **kwargs)
    if spacing == "leading":
        torch.testing.assert_close(listed, x, rtol=1e-10, atol=1e-10)
    else:
        assert (listed - x).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="prev_timestep"):
        dk.sample_ddim(model, shape, sched, prev_timestep="diffusers", **kwargs)
