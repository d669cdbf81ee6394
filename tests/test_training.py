"""Training objectives: the fused loss op against its reference, its instruction sets against the CUDA
thread bodies, gradcheck and opcheck; each objective against the peer's own code on the peer's
conventions given the same t and noise (diffusers' add_noise / get_velocity / compute_snr / SD3
helpers, score_sde's losses, EDM's EDMLoss); against mathematics (the exact model of Gaussian data sits
at the closed-form minimum, gradient descent on a linear model finds the optimum); batches that do not
depend on how they are split; and clear errors."""
import math

import edm_transcription as edm
import pytest
import score_sde_transcription as ssde
import torch
from common import DEVICES, cpu_isas

import diffkern as dk
from diffkern import coefficients, ops, reference
from diffkern.noise import TRAINING_NOISE_STREAM
from diffkern.training import DDPMObjective, EDMObjective, FlowMatchingObjective, ScoreMatchingObjective, training_loss

F64 = torch.float64
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def rows(batch, seed=0, zero=None):
    gen = torch.Generator().manual_seed(seed)
    values = [torch.rand(batch, generator=gen, dtype=F64) - 0.3 for _ in range(3)] + [
        torch.rand(batch, generator=gen, dtype=F64)]
    if zero is not None:
        values[zero] = torch.zeros(batch, dtype=F64)
    return coefficients.loss_rows(*values)


# ---- the fused op ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 1), (7, 3), (4, 2, 5), (3, 4095), (2, 4097), (2, 9000), (0, 3)])
@pytest.mark.parametrize("noise", ["stream", "tensor", "none"])
def test_loss_against_the_reference(device, dtype, shape, noise):
    """Within float32 rounding of the sums (float64: 1e-12 relative; the stream's normals are float32
    polynomials, NORMAL_ATOL of the reference's float64 Box-Muller); the inputs are rounded to dtype
    first, so both see the same values."""
    gen = torch.Generator().manual_seed(1)
    x0, m, z = (torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(3))
    table = rows(shape[0]).to(device)
    kwargs = dict(coefficients=table, stream_noise=noise == "stream", seed=5, step=2, sample_offset=3, stream=2)
    given = z if noise == "tensor" else None
    ours = ops.training_loss(x0, m, given, **kwargs)
    expected = reference.training_loss(x0, m, given, **kwargs)
    assert ours.dtype == F64 and ours.shape == (shape[0],)
    tolerance = LOSS_TOLERANCE[dtype] if noise != "stream" else max(LOSS_TOLERANCE[dtype], 1e-6)
    torch.testing.assert_close(ours.cpu(), expected.cpu(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 1), (33, 3), (17, 4), (17, 5), (9, 7, 5), (9, 64), (5, 512), (5, 513),
                                   (3, 4096), (2, 8195), (3, 20000)])
def test_instruction_sets_equal_the_cuda_thread_bodies_bitwise(dtype, shape):
    """'scalar' runs the per-thread bodies (every lane of every CUDA block, the tree, the chunks); the
    SIMD paths add the same numbers in the same order, forward and backward. The shapes cross the SIMD
    forward's paths: one block (<= 4 features), one round of the lanes (<= 512), whole chunks."""
    gen = torch.Generator().manual_seed(2)
    x0, m = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    table = rows(shape[0], zero=1)
    grad = torch.rand(shape[0], generator=gen, dtype=F64)
    args = (None, table, True, 7, 3, 11, TRAINING_NOISE_STREAM, None)
    losses = {isa: torch.ops.diffkern._training_loss_cpu_isa(x0, m, *args, isa) for isa in cpu_isas()}
    grads = {isa: torch.ops.diffkern._training_loss_backward_cpu_isa(grad, x0, m, *args, [True, True, False], isa)
             for isa in cpu_isas()}
    for isa in cpu_isas()[1:]:
        assert torch.equal(losses[isa], losses["scalar"]), isa
        assert all(torch.equal(a, b) for a, b in zip(grads[isa], grads["scalar"])), isa


@pytest.mark.parametrize("noise", ["stream", "tensor"])
def test_gradcheck(noise):
    gen = torch.Generator().manual_seed(3)
    x0, m, z = (torch.randn(3, 5, generator=gen, dtype=F64).requires_grad_(True) for _ in range(3))
    table = rows(3)
    if noise == "stream":
        def fn(a, b):
            return ops.training_loss(a, b, coefficients=table, stream_noise=True, seed=1, step=2)
        assert torch.autograd.gradcheck(fn, (x0, m))
    else:
        def fn(a, b, c):
            return ops.training_loss(a, b, c, coefficients=table)
        assert torch.autograd.gradcheck(fn, (x0, m, z))


def test_gradients_equal_autograd_through_the_reference():
    gen = torch.Generator().manual_seed(4)
    x0, m = (torch.randn(6, 9, generator=gen, dtype=F64) for _ in range(2))
    weights = torch.rand(6, generator=gen, dtype=F64)
    table = rows(6)
    grads = []
    for fn in (ops.training_loss, reference.training_loss):
        a, b = x0.clone().requires_grad_(True), m.clone().requires_grad_(True)
        (fn(a, b, coefficients=table, stream_noise=True, seed=3, step=1) * weights).sum().backward()
        grads.append((a.grad, b.grad))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=reference.NORMAL_RTOL, atol=reference.NORMAL_ATOL * 10)


def test_opcheck_and_fake_kernels():
    gen = torch.Generator().manual_seed(5)
    x0, m = (torch.randn(4, 6, generator=gen, dtype=F64).requires_grad_(True) for _ in range(2))
    torch.library.opcheck(torch.ops.diffkern.training_loss.default, (x0, m, None, rows(4), True, 1, 2, 3, 2, None))
    torch.library.opcheck(torch.ops.diffkern.training_loss.default, (x0, m, m.detach() * 2, rows(1), False, 0, 0, 0, 0,
                                                                      None))
    meta = torch.empty(4, 6, device="meta")
    with pytest.raises(RuntimeError, match="coefficients"):
        torch.ops.diffkern.training_loss(meta, meta, None, torch.zeros(4, 3, dtype=F64, device="meta"), True, 0, 0, 0,
                                         0, None)


def _saved_for_backward(fn):
    """The tensors autograd keeps between fn's forward and its backward (saved-tensor hooks)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def test_no_noise_sized_tensor_is_kept_for_the_backward():
    """Between forward and backward the fused loss keeps x0, the model output and the [B, 4] rows; the
    eager formula (torch.randn, the q_sample formula, mse_loss) keeps the noise as well: the check sees
    the difference."""
    x0 = torch.randn(8, 100)
    m = torch.randn(8, 100, requires_grad=True)
    kept = _saved_for_backward(lambda: dk.training_loss(lambda x, t: m, x0, "ddpm", seed=1, step=1))
    big = [t for t in kept if t.numel() >= x0.numel()]
    assert big and all(t.data_ptr() in (x0.data_ptr(), m.data_ptr()) for t in big), [t.shape for t in kept]

    def eager():
        noise = torch.randn_like(x0)
        torch.nn.functional.mse_loss(m, noise)

    big = [t for t in _saved_for_backward(eager) if t.numel() >= x0.numel()]
    assert any(t.data_ptr() not in (x0.data_ptr(), m.data_ptr()) for t in big)


def test_zero_coefficients_skip_their_input():
    x0 = torch.full((2, 3), float("inf"))
    m = torch.ones(2, 3)
    table = coefficients.loss_rows(1.0, 0.0, 0.0, 1.0)
    assert torch.equal(ops.training_loss(x0, m, coefficients=table), torch.full((2,), 3.0, dtype=F64))


# ---- each objective against its peer's own code ----

def _draws(batch):
    """The noise the fused q_sample and loss draw for a batch (seed 3, step 9, offset 0), as float64; a
    function of a shape or of a tensor (as torch.randn_like)."""
    def draw(like):
        shape = like.shape if isinstance(like, torch.Tensor) else like
        return dk.randn(tuple(shape), seed=3, step=9, stream=TRAINING_NOISE_STREAM, dtype=F64)
    return draw


def linear_model(out_scale=0.7):
    return lambda x, t: out_scale * x + 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("min_snr", [False, True])
def test_ddpm_against_diffusers(prediction_type, min_snr):
    """diffusers' DDPMScheduler.add_noise (and get_velocity for v) and F.mse_loss, with min-SNR-5 as
    diffusers' training scripts apply compute_snr; same t and noise. diffusers keeps its tables in
    float32, so 1e-5."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    scheduler = diffusers.DDPMScheduler()
    x0 = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    objective = DDPMObjective(prediction_type=prediction_type, weighting="min_snr" if min_snr else "none", gamma=5.0)
    model = linear_model()
    batch = training_loss(model, x0, objective, seed=3, step=9, return_batch=True)
    t, noise = batch.levels.draws["t"], _draws(16)(x0.shape)
    noisy = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(batch.x_t, noisy, rtol=1e-5, atol=1e-6)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    prediction = model(noisy, t)
    if min_snr:
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else (
            weights / (snr + 1) if prediction_type == "v_prediction" else weights)
        per_sample = torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2))
        expected = (per_sample * weights).mean()
    else:
        expected = torch.nn.functional.mse_loss(prediction, target)
    torch.testing.assert_close(batch.loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("reduce_mean", [True, False])
def test_score_matching_against_score_sde(sde_name, likelihood_weighting, reduce_mean):
    """score_sde's get_sde_loss_fn, transcribed, on its own SDE classes, given diffkern's uniforms and
    noise: per-sample losses to float64 rounding."""
    ours_sde = {"vp": dk.VPSDE(), "subvp": dk.SubVPSDE(), "ve": dk.VESDE()}[sde_name]
    theirs = {"vp": ssde.VPSDE(), "subvp": ssde.subVPSDE(), "ve": ssde.VESDE()}[sde_name]
    x0 = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = linear_model(-0.8)
    objective = ScoreMatchingObjective(ours_sde, likelihood_weighting=likelihood_weighting, reduce_mean=reduce_mean)
    batch = training_loss(model, x0, objective, seed=3, step=9, return_batch=True)
    u = (batch.levels.draws["t"] - 1e-5) / (1 - 1e-5)
    loss, per_sample = ssde.sde_loss(theirs, model, x0, lambda n: u, _draws(12), reduce_mean=reduce_mean,
                                     likelihood_weighting=likelihood_weighting)
    torch.testing.assert_close(batch.per_sample, per_sample, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batch.loss, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_discrete_score_matching_against_score_sde(sde_name):
    """continuous=False: score_sde's get_ddpm_loss_fn (VP) and get_smld_loss_fn (VE, NCSN's sigma^2
    weighting), transcribed, given diffkern's labels and noise."""
    x0 = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    model = linear_model(-0.3)
    ours_sde, theirs = (dk.VPSDE(), ssde.VPSDE()) if sde_name == "vp" else (dk.VESDE(), ssde.VESDE())
    objective = ScoreMatchingObjective(ours_sde, continuous=False, reduce_mean=sde_name == "vp")
    batch = training_loss(model, x0, objective, seed=3, step=9, return_batch=True)
    labels = batch.levels.draws["t"]
    fn = ssde.ddpm_loss if sde_name == "vp" else ssde.smld_loss
    loss, per_sample = fn(theirs, model, x0, lambda high, n: labels, _draws(12), reduce_mean=sde_name == "vp")
    torch.testing.assert_close(batch.per_sample, per_sample, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting", ["edm", "soft_min_snr", "snr"])
def test_edm_against_edm_loss(weighting):
    """EDM's EDMLoss with EDMPrecond around the same raw network F, transcribed, given diffkern's
    log-normal draws and noise: EDM sums over elements (reduce="sum"). k-diffusion's weightings are its
    F-space MSE times its c_weight."""
    x0 = torch.randn(10, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    net = torch.nn.Linear(6, 6).double()

    def raw(x, c_noise):
        return net(x) * (1 + c_noise[:, None])
    objective = EDMObjective(weighting=weighting, reduce="sum")
    batch = training_loss(raw, x0, objective, seed=3, step=9, return_batch=True)
    sigma = batch.levels.draws["sigma"]
    rnd_normal = (sigma.log() - (-1.2)) / 1.2
    noise = _draws(10)(x0.shape)
    precond = edm.EDMPrecond(raw)
    if weighting == "edm":
        expected = edm.edm_loss(precond, x0, rnd_normal, noise).sum(1)
    else:  # k-diffusion's Denoiser.loss: (F - target)^2 times c_weight, target = (x0 - c_skip x) / c_out
        s = sigma[:, None]
        c_skip, c_out = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt()
        c_weight = (s * 0.5) ** 2 / (s ** 2 + 0.25) ** 2 if weighting == "soft_min_snr" else 0.25 / (s ** 2 + 0.25)
        x = x0 + noise * s
        f = raw(x / (s ** 2 + 0.25).sqrt(), (s.log() / 4).flatten())
        expected = ((f - (x0 - c_skip * x) / c_out) ** 2 * c_weight).sum(1)
    torch.testing.assert_close(batch.per_sample, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_matching_against_diffusers_sd3_helpers(sampling, weighting, monkeypatch):
    """diffusers' compute_density_for_timestep_sampling (fed diffkern's normals / uniforms in place of
    torch.normal / torch.rand) and compute_loss_weighting_for_sd3, and the SD3 training script's loss
    (transcribed), noisy = (1 - sigma) x0 + sigma noise, target noise - x0."""
    pytest.importorskip("diffusers")
    from diffusers import training_utils

    x0 = torch.randn(9, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    model = linear_model(0.5)
    objective = FlowMatchingObjective(timestep_sampling=sampling, weighting=weighting)
    batch = training_loss(model, x0, objective, seed=3, step=9, return_batch=True)
    from diffkern.training.draws import BatchKey, normal, uniform
    key = BatchKey(3, 9, 0)
    monkeypatch.setattr(torch, "normal", lambda mean, std, size, **kw: mean + std * normal(size[0], key, "cpu"))
    monkeypatch.setattr(torch, "rand", lambda size, **kw: uniform(size[0], key, "cpu"))
    u = training_utils.compute_density_for_timestep_sampling(sampling, 9, logit_mean=0.0, logit_std=1.0,
                                                             mode_scale=1.29)
    monkeypatch.undo()
    torch.testing.assert_close(batch.levels.draws["t"], u, rtol=1e-12, atol=1e-12)
    sigmas = u[:, None]
    noise = _draws(9)(x0.shape)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    target = noise - x0
    weights = training_utils.compute_loss_weighting_for_sd3(weighting, sigmas)
    expected = torch.mean((weights * (model(noisy, u) - target) ** 2).reshape(9, -1), 1).mean()
    # diffusers rounds the sigma_sqrt weighting to float32 ((sigmas ** -2.0).float())
    tolerance = 1e-7 if weighting == "sigma_sqrt" else 1e-10
    torch.testing.assert_close(batch.loss, expected, rtol=tolerance, atol=1e-12)


# ---- mathematics: Gaussian data ----

MU, S, D = 0.7, 1.3, 512


def _gaussian_x0(n, seed=0):
    return MU + S * torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name", ["ddpm", "score_matching", "edm", "flow_matching"])
def test_the_exact_model_sits_at_the_irreducible_minimum(name):
    """For x0 ~ N(mu, s^2 I) each objective's optimal model is closed-form, and its expected loss per
    feature is the posterior variance of the target: for the exact model every per-sample loss (a mean
    over 512 features) equals that minimum at its own t, within 6 standard errors (sqrt(2 / 512) of
    it, the spread of a mean of 512 squared normals)."""
    x0 = _gaussian_x0(64)
    if name == "ddpm":
        objective = DDPMObjective()
        abar_table = dk.DDPMSchedule().alphas_cumprod

        def model(x, t):  # E[z | x_t]
            a, s = abar_table[t].sqrt()[:, None], (1 - abar_table[t]).sqrt()[:, None]
            return s * (x - a * MU) / (a ** 2 * S ** 2 + s ** 2)

        def minimum(batch):
            abar = batch.levels.draws["alphas_cumprod"]
            return abar * S ** 2 / (abar * S ** 2 + 1 - abar)
    elif name == "score_matching":
        sde = dk.VPSDE()
        objective = ScoreMatchingObjective(sde)

        def model(x, t):
            a, s = sde.mean_coef(t)[:, None], sde.marginal_std(t)[:, None]
            return -(x - a * MU) / (a ** 2 * S ** 2 + s ** 2)

        def minimum(batch):  # |std s + z|^2: Var(z | x_t)
            t = batch.levels.draws["t"]
            a, s = sde.mean_coef(t), sde.marginal_std(t)
            return a ** 2 * S ** 2 / (a ** 2 * S ** 2 + s ** 2)
    elif name == "edm":
        objective = EDMObjective()

        def model(x, c_noise):  # F from the exact denoiser D = (S^2 x + sigma^2 mu) / (S^2 + sigma^2)
            sigma = (4 * c_noise).exp()[:, None]
            c_skip, c_out, c_in, _ = coefficients.edm_preconditioning(sigma, 0.5)
            x_t = x / c_in
            return ((S ** 2 * x_t + sigma ** 2 * MU) / (S ** 2 + sigma ** 2) - c_skip * x_t) / c_out

        def minimum(batch):  # lambda(sigma) Var(x0 | x)
            sigma = batch.levels.draws["sigma"]
            return coefficients.edm_weight(sigma, 0.5) * S ** 2 * sigma ** 2 / (S ** 2 + sigma ** 2)
    else:
        objective = FlowMatchingObjective()

        def model(x, t):  # E[z - x0 | x_t], x_t = (1 - t) x0 + t z
            t = t[:, None]
            var = (1 - t) ** 2 * S ** 2 + t ** 2
            cov = t - (1 - t) * S ** 2  # Cov(z - x0, x_t)
            return -MU + cov * (x - (1 - t) * MU) / var

        def minimum(batch):
            t = batch.levels.draws["t"]
            return (S ** 2 + 1) - (t - (1 - t) * S ** 2) ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2)
    batch = training_loss(model, x0, objective, seed=1, step=4, return_batch=True)
    expected = minimum(batch)
    relative = ((batch.per_sample - expected) / expected).detach()
    assert relative.abs().max() < 6 * math.sqrt(2 / D), relative.abs().max()
    assert abs(float(relative.mean())) < 6 * math.sqrt(2 / D / 64)


def test_gradient_descent_on_a_linear_model_finds_the_optimum():
    """One DDPM timestep (T = 1), 1-d Gaussian data: eps(x) = w x + b has the optimum w* = s / (a^2 S^2 +
    s^2), b* = -s a mu / (a^2 S^2 + s^2). Adam on fresh batches drawn from (seed, step) reaches it to 2%."""
    schedule = dk.DDPMSchedule(betas=[0.4])
    a, s = math.sqrt(0.6), math.sqrt(0.4)
    w_star, b_star = s / (a ** 2 * S ** 2 + s ** 2), -s * a * MU / (a ** 2 * S ** 2 + s ** 2)
    w = torch.zeros((), dtype=F64, requires_grad=True)
    b = torch.zeros((), dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.02)
    objective = DDPMObjective(schedule=schedule)
    for step in range(600):
        x0 = MU + S * dk.randn((1024, 1), seed=7, step=step, stream=77, dtype=F64)
        optimizer.zero_grad()
        training_loss(lambda x, t: w * x + b, x0, objective, seed=5, step=step).backward()
        optimizer.step()
    w, b = w.item(), b.item()
    assert abs(w - w_star) < 0.02 * abs(w_star) and abs(b - b_star) < 0.02 * abs(b_star) + 0.005


# ---- batches that do not depend on how they are split ----

@pytest.mark.parametrize("name", ["ddpm", "score_matching", "edm", "flow_matching"])
def test_a_batch_split_in_two_is_the_same_batch(name):
    x0 = torch.randn(10, 3, 4)
    model = linear_model(0.9)
    cond = torch.arange(10)

    def conditioned(x, t, c):
        return model(x, t) * (1 + 0.01 * c.reshape(-1, 1, 1))
    kwargs = dict(seed=11, step=6, cond=cond, null_cond=torch.tensor(-1), p_uncond=0.3, return_batch=True)
    whole = training_loss(conditioned, x0, name, **kwargs)
    parts = [training_loss(conditioned, x0[a:b], name, sample_offset=a, **dict(kwargs, cond=cond[a:b]))
             for a, b in ((0, 4), (4, 10))]
    for field in ("per_sample", "x_t", "dropped"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field
    assert 0 < int(whole.dropped.sum()) < 10


def test_the_noise_is_q_samples_noise():
    x0 = torch.randn(6, 5, dtype=F64)
    batch = training_loss(linear_model(), x0, "flow_matching", seed=2, step=3, sample_offset=4, return_batch=True)
    t = batch.levels.draws["t"][:, None]
    z = dk.randn((6, 5), seed=2, step=3, sample_offset=4, stream=TRAINING_NOISE_STREAM, dtype=F64)
    torch.testing.assert_close(batch.x_t, (1 - t) * x0 + t * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_batches_compute_in_float32(dtype):
    x0 = torch.randn(8, 6, dtype=F64)
    ours = training_loss(linear_model(), x0.to(dtype), "ddpm", seed=1, step=1)
    exact = training_loss(linear_model(), x0.to(dtype).double(), "ddpm", seed=1, step=1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)


# ---- bad arguments ----

@pytest.mark.parametrize("call,match", [
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "nope", seed=0, step=0), "unknown objective"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, weighting="x"), "weighting"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, weighting="min_snr",
                           gamma=0.0), "gamma"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, p_uncond=1.5), "p_uncond"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, p_uncond=-0.1), "p_uncond"),
    (lambda: training_loss(lambda x, t: x[:, :1], torch.randn(4, 2), "ddpm", seed=0, step=0), "returned shape"),
    (lambda: training_loss(linear_model(), torch.randn(4), "ddpm", seed=0, step=0), "x0"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=-1, step=0), "seed"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=2 ** 32), "step"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "edm", seed=0, step=0, p_std=0.0), "p_std"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "flow_matching", seed=0, step=0,
                           timestep_sampling="beta"), "timestep_sampling"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "score_matching", seed=0, step=0,
                           continuous=False, likelihood_weighting=True), "likelihood_weighting"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), DDPMObjective(), seed=0, step=0,
                           prediction_type="sample"), "options"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, weights=torch.ones(3)),
     "weights"),
    (lambda: training_loss(linear_model(), torch.randn(4, 2), "ddpm", seed=0, step=0, p_uncond=0.5), "null_cond"),
    (lambda: ops.training_loss(torch.randn(4, 2), torch.randn(4, 3), coefficients=rows(4)), "model_output"),
    (lambda: ops.training_loss(torch.randn(4, 2), torch.randn(4, 2), coefficients=rows(3)), "coefficients"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
