"""score_sde's predictor-corrector sampler and training losses, transcribed from
yang-song/score_sde_pytorch (`sde_lib.py`: VPSDE, subVPSDE, VESDE, SDE.discretize, SDE.reverse,
marginal_prob; `sampling.py`: ReverseDiffusionPredictor, EulerMaruyamaPredictor, LangevinCorrector,
get_pc_sampler; `losses.py`: get_sde_loss_fn, get_smld_loss_fn, get_ddpm_loss_fn) on its own
conventions: each SDE carries its N-point tables, the sampler walks linspace(T, eps, N) and indexes
the tables with (t (N - 1) / T).long(). Only two things differ from the original: tensors are
[batch, features] (score_sde broadcasts with [:, None, None, None]), and torch.randn_like is a
`draw(x)` callback, so that a test can feed the noise diffkern draws (and the losses' torch.rand and
torch.randint are `rand(n)` and `randint(high, n)` callbacks). Nothing here imports diffkern: it is the
independent reference sample_pc and the score-matching objectives are checked against."""
import math

import torch


class SDE:
    def __init__(self, N):
        self.N = N

    @property
    def T(self):
        return 1

    def discretize(self, x, t):  # the Euler discretisation, dt = 1 / N
        dt = 1 / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn):
        forward = self

        class ReverseSDE:
            N = forward.N
            T = forward.T

            def sde(self, x, t):
                drift, diffusion = forward.sde(x, t)
                return drift - diffusion[:, None] ** 2 * score_fn(x, t), diffusion

            def discretize(self, x, t):
                f, G = forward.discretize(x, t)
                return f - G[:, None] ** 2 * score_fn(x, t), G

        return ReverseSDE()


class VPSDE(SDE):
    def __init__(self, beta_min=0.1, beta_max=20, N=1000):
        super().__init__(N)
        self.beta_0, self.beta_1 = beta_min, beta_max
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def marginal_prob(self, x, t):
        log_mean_coeff = -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        mean = torch.exp(log_mean_coeff[:, None]) * x
        std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))
        return mean, std

    def sde(self, x, t):
        beta_t = self.beta_0 + t * (self.beta_1 - self.beta_0)
        return -0.5 * beta_t[:, None] * x, torch.sqrt(beta_t)

    def prior_sampling(self, noise):
        return noise

    def discretize(self, x, t):
        timestep = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_betas[timestep]
        alpha = self.alphas[timestep]
        return torch.sqrt(alpha)[:, None] * x - x, torch.sqrt(beta)


class subVPSDE(SDE):
    def __init__(self, beta_min=0.1, beta_max=20, N=1000):
        super().__init__(N)
        self.beta_0, self.beta_1 = beta_min, beta_max

    def sde(self, x, t):
        beta_t = self.beta_0 + t * (self.beta_1 - self.beta_0)
        discount = 1.0 - torch.exp(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t ** 2)
        return -0.5 * beta_t[:, None] * x, torch.sqrt(beta_t * discount)

    def marginal_prob(self, x, t):
        log_mean_coeff = -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        mean = torch.exp(log_mean_coeff)[:, None] * x
        std = 1 - torch.exp(2.0 * log_mean_coeff)
        return mean, std

    def prior_sampling(self, noise):
        return noise


class VESDE(SDE):
    def __init__(self, sigma_min=0.01, sigma_max=50, N=1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N,
                                                        dtype=torch.float64))

    def sde(self, x, t):
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        diffusion = sigma * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return torch.zeros_like(x), diffusion

    def prior_sampling(self, noise):
        return noise * self.sigma_max

    def marginal_prob(self, x, t):
        std = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return x, std

    def discretize(self, x, t):
        timestep = (t * (self.N - 1) / self.T).long()
        sigma = self.discrete_sigmas[timestep]
        adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(t), self.discrete_sigmas[timestep - 1])
        return torch.zeros_like(x), torch.sqrt(sigma ** 2 - adjacent_sigma ** 2)


def reverse_diffusion_predictor(sde, score_fn, x, t, draw):
    f, G = sde.reverse(score_fn).discretize(x, t)
    z = draw(x)
    x_mean = x - f
    return x_mean + G[:, None] * z, x_mean


def euler_maruyama_predictor(sde, score_fn, x, t, draw):
    rsde = sde.reverse(score_fn)
    dt = -1.0 / rsde.N
    z = draw(x)
    drift, diffusion = rsde.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + diffusion[:, None] * math.sqrt(-dt) * z, x_mean


def langevin_corrector(sde, score_fn, x, t, snr, n_steps, draw):
    if isinstance(sde, (VPSDE, subVPSDE)):
        timestep = (t * (sde.N - 1) / sde.T).long()
        alpha = sde.alphas[timestep]  # as score_sde: subVPSDE has no alphas, so this fails for it
    else:
        alpha = torch.ones_like(t)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = draw(x)
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
        x_mean = x + step_size[:, None] * grad
        x = x_mean + torch.sqrt(step_size * 2)[:, None] * noise
    return x, x_mean


def pc_sampler(sde, score_fn, prior_noise, draw, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
               n_steps=1, denoise=True, eps=1e-3):
    predict = {"reverse_diffusion": reverse_diffusion_predictor, "euler_maruyama": euler_maruyama_predictor}[predictor]
    x = sde.prior_sampling(prior_noise)
    timesteps = torch.linspace(sde.T, eps, sde.N, dtype=torch.float64)
    x_mean = x
    for i in range(sde.N):
        vec_t = torch.ones(x.shape[0], dtype=torch.float64) * timesteps[i]
        if corrector is not None:
            x, x_mean = langevin_corrector(sde, score_fn, x, vec_t, snr, n_steps, draw)
        x, x_mean = predict(sde, score_fn, x, vec_t, draw)
    return x_mean if denoise else x


# ---- losses.py (score models as functions score_fn(x, t) / model_fn(x, labels)) ----

def _reduce_op(reduce_mean):
    return torch.mean if reduce_mean else lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)


def sde_loss(sde, score_fn, batch, rand, draw, reduce_mean=True, likelihood_weighting=True, eps=1e-5):
    """get_sde_loss_fn's loss_fn: returns (loss, per-sample losses)."""
    reduce_op = _reduce_op(reduce_mean)
    t = rand(batch.shape[0]) * (sde.T - eps) + eps
    z = draw(batch)
    mean, std = sde.marginal_prob(batch, t)
    perturbed_data = mean + std[:, None] * z
    score = score_fn(perturbed_data, t)
    if not likelihood_weighting:
        losses = torch.square(score * std[:, None] + z)
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
    else:
        g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
        losses = torch.square(score + z / std[:, None])
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * g2
    return torch.mean(losses), losses


def smld_loss(vesde, model_fn, batch, randint, draw, reduce_mean=False):
    """get_smld_loss_fn's loss_fn (NCSN): returns (loss, per-sample losses)."""
    smld_sigma_array = torch.flip(vesde.discrete_sigmas, dims=(0,))
    reduce_op = _reduce_op(reduce_mean)
    labels = randint(vesde.N, batch.shape[0])
    sigmas = smld_sigma_array[labels]
    noise = draw(batch) * sigmas[:, None]
    perturbed_data = noise + batch
    score = model_fn(perturbed_data, labels)
    target = -noise / (sigmas ** 2)[:, None]
    losses = torch.square(score - target)
    losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * sigmas ** 2
    return torch.mean(losses), losses


def ddpm_loss(vpsde, model_fn, batch, randint, draw, reduce_mean=True):
    """get_ddpm_loss_fn's loss_fn: returns (loss, per-sample losses)."""
    reduce_op = _reduce_op(reduce_mean)
    labels = randint(vpsde.N, batch.shape[0])
    noise = draw(batch)
    perturbed_data = (vpsde.sqrt_alphas_cumprod[labels, None] * batch
                      + vpsde.sqrt_1m_alphas_cumprod[labels, None] * noise)
    score = model_fn(perturbed_data, labels)
    losses = torch.square(score - noise)
    losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
    return torch.mean(losses), losses
