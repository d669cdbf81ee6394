"""PFGM's training perturbation and loss (Xu et al. 2022, github.com/Newbeeer/Poisson_flow:
models/utils_poisson.py forward_pz and losses.py get_loss_fn's 'poisson' branch), transcribed on PFGM's
conventions for tests. PFGM draws its random numbers inside with torch.randn / torch.rand; here they are
arguments (in PFGM's order of use) so that a test can hand both implementations the same numbers."""
import numpy as np
import torch


def forward_pz(samples_batch, m, *, sigma_end, tau, restrict_m, z_normal, restrict_uniform, noise_normal, gaussian):
    """forward_pz: z_normal [B] (its torch.randn((B, 1, 1, 1))), restrict_uniform (its torch.rand of the
    restricted samples), noise_normal [B, N] (its torch.randn_like(samples_batch)), gaussian [B, N]."""
    z = z_normal.reshape(len(samples_batch), 1, 1, 1) * sigma_end
    z = z.abs()
    if restrict_m is not None:
        idx = (z < 0.005).squeeze()
        m = m.clone()
        m[idx] = restrict_uniform[idx] * restrict_m
    multiplier = (1 + tau) ** m
    noise = noise_normal.reshape(len(samples_batch), -1) * sigma_end
    norm_m = torch.norm(noise, p=2, dim=1) * multiplier
    perturbed_z = z.squeeze() * multiplier
    unit_gaussian = gaussian / torch.norm(gaussian, p=2, dim=1, keepdim=True)
    perturbation_x = (unit_gaussian * norm_m[:, None]).view_as(samples_batch)
    perturbed_x = samples_batch + perturbation_x
    return torch.cat((perturbed_x.reshape(len(samples_batch), -1), perturbed_z[:, None]), dim=1)


def poisson_loss(net_fn, samples_full, perturbed_samples_vec, *, gamma, reduce_mean=True):
    """The loss of get_loss_fn's 'poisson' branch from the perturbed batch: the empirical field of the full
    batch, normalised with gamma, against the network's prediction."""
    reduce_op = torch.mean if reduce_mean else lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)
    with torch.no_grad():
        real_samples_vec = torch.cat((samples_full.reshape(len(samples_full), -1),
                                      torch.zeros((len(samples_full), 1)).to(samples_full)), dim=1)
        data_dim = samples_full[0].numel()
        gt_distance = torch.sum((perturbed_samples_vec.unsqueeze(1) - real_samples_vec) ** 2, dim=[-1]).sqrt()
        distance = torch.min(gt_distance, dim=1, keepdim=True)[0] / (gt_distance + 1e-7)
        distance = distance ** (data_dim + 1)
        distance = distance[:, :, None]
        coeff = distance / (torch.sum(distance, dim=1, keepdim=True) + 1e-7)
        diff = - (perturbed_samples_vec.unsqueeze(1) - real_samples_vec)
        gt_direction = torch.sum(coeff * diff, dim=1)
        gt_direction = gt_direction.view(gt_direction.size(0), -1)
    gt_norm = gt_direction.norm(p=2, dim=1)
    gt_direction /= (gt_norm.view(-1, 1) + gamma)
    gt_direction *= np.sqrt(data_dim)
    target = gt_direction
    perturbed_samples_x = perturbed_samples_vec[:, :-1]
    perturbed_samples_z = torch.clamp(perturbed_samples_vec[:, -1], 1e-10)
    net_x, net_z = net_fn(perturbed_samples_x, perturbed_samples_z)
    net_x = net_x.view(net_x.shape[0], -1)
    net = torch.cat([net_x, net_z[:, None]], dim=1)
    loss = ((net - target) ** 2)
    loss = reduce_op(loss.reshape(loss.shape[0], -1), dim=-1)
    return torch.mean(loss), target
