"""EDM's training loss and preconditioning, transcribed from NVlabs/edm (`training/loss.py`: EDMLoss;
`training/networks.py`: EDMPrecond.forward) on its own conventions, with torch.randn and
torch.randn_like as arguments (rnd_normal, unit noise) so that a test can feed diffkern's draws,
[batch, features] tensors instead of images, and no augmentation. Nothing here imports diffkern."""


class EDMPrecond:
    def __init__(self, model, sigma_data=0.5):
        self.model, self.sigma_data = model, sigma_data

    def __call__(self, x, sigma):
        sigma = sigma.reshape(-1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * F_x


def edm_loss(net, images, rnd_normal, unit_noise, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """EDMLoss.__call__: the per-element loss weight * (D(y + n, sigma) - y)^2."""
    rnd_normal = rnd_normal.reshape(-1, 1)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    y = images
    n = unit_noise * sigma
    D_yn = net(y + n, sigma)
    return weight * ((D_yn - y) ** 2)
