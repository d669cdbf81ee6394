"""Networks the ``train`` command builds, and the wrappers that give a trained network the convention of
the samplers (the registry's model kinds).

- ``TimeMLP``: an MLP on flattened samples with a sinusoidal embedding of the time, for low-dimensional
  data;
- ``unet``: diffusers' UNet2DModel for images (needs diffusers);
- ``ConvUNet``: a small convolutional UNet for images in plain PyTorch (no diffusers needed: the
  shipped digits models are ConvUNets, so they load wherever diffkern does);
- ``TimeScaled``: feeds a network time * scale (a DDPM timestep is in [0, T); a flow or SDE time in
  [0, 1]; EDM's c_noise around [-1.5, 1]: each network sees times of the size its embedding expects);
- ``DividedByStd``: a score model as net / std(t), so the network predicts something of unit size;
- ``NoiseLevelLabels``: a network trained on discrete noise-level labels as a score of sigma;
- ``ConcatSquashMLP``: FFJORD's concat-squash MLP, a CNF's dynamics f(z, t);
- ``FieldHead``: a network with one output more as a Poisson-field model (x, z) -> (v_x, v_z);
- ``EDMPrecond``: EDM's preconditioning, D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), the
  denoiser dk.sample_heun and friends take.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import coefficients
from .._model import model_output_of


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] times -> [B, dim] float32: sin and cos of t at dim / 2 frequencies from 1 down to 1e-4 (the
    transformer's position embedding, as DDPM embeds its timestep)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.reshape(-1, 1).to(torch.float32) * frequencies
    return torch.cat([angles.sin(), angles.cos()], 1)


class TimeMLP(torch.nn.Module):
    """x [B, ...] and a time [B] -> [B, ...]: the flattened sample and a sinusoidal embedding of the time
    through ``depth`` SiLU layers of width ``hidden``."""

    def __init__(self, features: int, hidden: int = 256, depth: int = 3, embedding: int = 64,
                 out_features: Optional[int] = None):
        super().__init__()
        if embedding % 2:
            raise ValueError(f"embedding must be even, got {embedding}")
        self.features, self.embedding = int(features), int(embedding)
        self.out_features = self.features if out_features is None else int(out_features)
        layers, width = [], self.features + self.embedding
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, self.out_features))
        self.net = torch.nn.Sequential(*layers)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t, self.embedding)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        embedding = self.time_embedding(t).to(flat.dtype)
        out = self.net(torch.cat([flat, embedding], 1))
        return out.reshape(x.shape) if self.out_features == self.features else out


class ConcatSquash(torch.nn.Module):
    """FFJORD's concat-squash layer: (W x + c) * sigmoid(a t + d) + b t, with a per-sample time."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.layer = torch.nn.Linear(inputs, outputs)
        self.hyper_gate = torch.nn.Linear(1, outputs)
        self.hyper_bias = torch.nn.Linear(1, outputs, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * torch.sigmoid(self.hyper_gate(t)) + self.hyper_bias(t)


class ConcatSquashMLP(torch.nn.Module):
    """A CNF's dynamics f(z, t) [B, ...] -> [B, ...] as FFJORD's toy models build it: concat-squash
    layers of widths ``hidden`` (FFJORD's 64-64-64) with tanh between them (smooth, so the ODE stays
    non-stiff and its Jacobian products well defined)."""

    def __init__(self, features: int, hidden=(64, 64, 64)):
        super().__init__()
        widths = [int(features)] + [int(h) for h in hidden] + [int(features)]
        self.layers = torch.nn.ModuleList(ConcatSquash(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = z.reshape(z.shape[0], -1)
        t = (t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t).reshape(-1, 1).to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, t)
            if i < len(self.layers) - 1:
                h = torch.tanh(h)
        return h.reshape(z.shape)


def unet(sample_shape, block_out_channels=(32, 64), layers_per_block: int = 1, norm_num_groups: int = 8,
         extra_channels: int = 0):
    """diffusers' UNet2DModel for samples of shape (channels, height, width) (with ``extra_channels``
    more outputs: a Poisson field's z part)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ValueError("model 'unet' is diffusers' UNet2DModel: pip install diffusers, or use model 'convunet' (a "
                         "small UNet in plain PyTorch)") from None
    if len(sample_shape) != 3:
        raise ValueError(f"model 'unet' takes images (channels, height, width), got samples of shape "
                         f"{tuple(sample_shape)}")
    channels, height, width = sample_shape
    blocks = len(block_out_channels)
    return UNet2DModel(sample_size=(height, width), in_channels=channels, out_channels=channels + extra_channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       norm_num_groups=norm_num_groups, down_block_types=("DownBlock2D",) * blocks,
                       up_block_types=("UpBlock2D",) * blocks)


class _ResBlock(torch.nn.Module):
    """GroupNorm, SiLU, 3x3 conv, plus the time embedding's projection, twice; a 1x1 conv on the skip
    when the width changes (DDPM's residual block without dropout or attention)."""

    def __init__(self, inputs: int, outputs: int, embedding: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = torch.nn.GroupNorm(groups, inputs), torch.nn.Conv2d(inputs, outputs, 3, padding=1)
        self.time = torch.nn.Linear(embedding, outputs)
        self.norm2, self.conv2 = torch.nn.GroupNorm(groups, outputs), torch.nn.Conv2d(outputs, outputs, 3, padding=1)
        self.skip = torch.nn.Conv2d(inputs, outputs, 1) if inputs != outputs else torch.nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.nn.functional.silu(self.norm1(x))) + self.time(embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(torch.nn.functional.silu(self.norm2(h)))


class ConvUNet(torch.nn.Module):
    """A small UNet for images (channels, height, width) in plain PyTorch: a residual block per level of
    widths ``block_out_channels``, stride-2 convolutions down and nearest upsampling up with skip
    connections, the time through a sinusoidal embedding and an MLP into every block. model(x, t) ->
    [B, channels + extra_channels, height, width]; height and width must halve len(block_out_channels)
    - 1 times."""

    def __init__(self, sample_shape, block_out_channels=(32, 64), embedding: int = 64, norm_num_groups: int = 8,
                 extra_channels: int = 0):
        super().__init__()
        if len(sample_shape) != 3:
            raise ValueError(f"model 'convunet' takes images (channels, height, width), got samples of shape "
                             f"{tuple(sample_shape)}")
        widths = [int(w) for w in block_out_channels]
        if not widths or any(w < 1 or w % norm_num_groups for w in widths):
            raise ValueError(f"block_out_channels must be widths that norm_num_groups={norm_num_groups} divides, got "
                             f"{list(block_out_channels)}")
        if embedding < 2 or embedding % 2:
            raise ValueError(f"embedding must be an even width, got {embedding}")
        channels, height, width = (int(v) for v in sample_shape)
        factor = 2 ** (len(widths) - 1)
        if height % factor or width % factor:
            raise ValueError(f"model 'convunet' with {len(widths)} levels needs a height and width divisible by "
                             f"{factor}, got {height}x{width}")
        self.embedding = int(embedding)
        self.time = torch.nn.Sequential(torch.nn.Linear(self.embedding, 4 * widths[0]), torch.nn.SiLU(),
                                        torch.nn.Linear(4 * widths[0], 4 * widths[0]))
        temb = 4 * widths[0]
        self.stem = torch.nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = torch.nn.ModuleList(_ResBlock(a, b, temb, norm_num_groups) for a, b in zip(widths[:1] + widths,
                                                                                                 widths))
        self.downsample = torch.nn.ModuleList(torch.nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.middle = _ResBlock(widths[-1], widths[-1], temb, norm_num_groups)
        self.up = torch.nn.ModuleList(_ResBlock(2 * w, w_out, temb, norm_num_groups)
                                      for w, w_out in zip(widths[::-1], widths[::-1][1:] + widths[:1]))
        self.upsample = torch.nn.ModuleList(torch.nn.Conv2d(w, w, 3, padding=1) for w in widths[::-1][1:])
        self.out = torch.nn.Sequential(torch.nn.GroupNorm(norm_num_groups, widths[0]), torch.nn.SiLU(),
                                       torch.nn.Conv2d(widths[0], channels + int(extra_channels), 3, padding=1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        embedding = self.time(sinusoidal_embedding(t, self.embedding).to(x.dtype))
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, embedding)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, embedding)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), embedding)
            if i < len(self.upsample):
                h = self.upsample[i](torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


class TimeScaled(torch.nn.Module):
    """net(x, time * scale), its prediction tensor (a diffusers model's .sample)."""

    def __init__(self, net: torch.nn.Module, scale: float = 1.0):
        super().__init__()
        self.net, self.scale = net, float(scale)

    def forward(self, x, t, *args, **kwargs):
        t = t * self.scale if self.scale != 1.0 else t
        # a float32 network run in float64 (evaluate's likelihoods) computes in its own precision and
        # answers in the caller's
        dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), x.dtype)
        if x.dtype == dtype:
            return model_output_of(self.net(x, t, *args, **kwargs))
        return model_output_of(self.net(x.to(dtype), t, *args, **kwargs)).to(x.dtype)


class FieldHead(torch.nn.Module):
    """A Poisson-field model (x, z) -> (v_x, v_z) around a network with one output more than the data has
    features (an MLP's N + 1 outputs, or an image network's C + 1 channels, whose last channel's mean is
    the z part): the network sees log(z) * ``time_scale`` as its time (z spans decades), and v_z =
    -softplus(.) is negative everywhere, as the normalised field above the data is, so the sampler's
    dx/dz = v_x / v_z never divides by a z part of the wrong sign.

    ``radial`` (for an MLP on flat samples): the network is given x / r and log r, r = (|x|^2 + z^2 + 1)^(1/2),
    instead of x. PFGM's prior puts samples of low-dimensional data at radii of 10^4 and more (its radial
    law has a tail in r^-2 at N = 2), far beyond the perturbations the network was trained on; in these
    coordinates a far point is a direction and one more decade, where the field is a point charge's."""

    def __init__(self, net: torch.nn.Module, time_scale: float = 100.0, radial: bool = False):
        super().__init__()
        self.net, self.time_scale, self.radial = net, float(time_scale), bool(radial)

    def forward(self, x: torch.Tensor, z, *args, **kwargs):
        z = torch.as_tensor(z, device=x.device).reshape(-1).expand(x.shape[0])
        dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), x.dtype)
        z64 = z.to(torch.float64)
        t = z64.clamp_min(1e-30).log() * self.time_scale
        inputs = x.to(dtype)
        if self.radial:
            flat = x.reshape(x.shape[0], -1).to(torch.float64)
            r = (flat.square().sum(1) + z64.square() + 1).sqrt()
            inputs = torch.cat([flat / r[:, None], r.log()[:, None]], 1).to(dtype)
        out = model_output_of(self.net(inputs, t.to(dtype), *args, **kwargs))
        batch = x.shape[0]
        if out.dim() == 2:  # [B, N + 1]
            v_x, v_z = out[:, :-1].reshape(x.shape), out[:, -1]
        else:  # [B, C + 1, ...]
            v_x, v_z = out[:, :-1].reshape(x.shape), out[:, -1].reshape(batch, -1).mean(1)
        return v_x.to(x.dtype), -torch.nn.functional.softplus(v_z).to(torch.float64 if x.dtype == torch.float64
                                                                        else torch.float32)


class GeometricLevels:
    """The N noise levels sigma_max (sigma_min / sigma_max)^(label / (N - 1)), label 0 .. N - 1 (score_sde's
    discrete SMLD / NCSN chain), for fractional labels too."""

    def __init__(self, sigma_min: float, sigma_max: float, num_scales: int):
        self.log_max, self.log_ratio = math.log(sigma_max), math.log(sigma_max / sigma_min)
        self.last = max(num_scales - 1, 1)

    def sigma(self, label: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_max - label.to(torch.float64) / self.last * self.log_ratio)

    def label(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.log_max - sigma.to(torch.float64).log()) / self.log_ratio * self.last


class DividedByStd(torch.nn.Module):
    """A score model net(x, t) / std(t) (score_sde's parameterization: its VP models' score is -model / std,
    its NCSN++ divides by sigma): the network predicts something of unit size, the noise, where the
    score itself grows as 1 / std at small noise and a plain network never learns it."""

    def __init__(self, net, std):
        super().__init__()
        self.net, self.std = net, std

    def forward(self, x, t, *args, **kwargs):
        std = self.std(torch.as_tensor(t, device=x.device).reshape(-1)).to(torch.float64)
        out = model_output_of(self.net(x, t, *args, **kwargs))
        return (out.double() / std.reshape((-1,) + (1,) * (x.dim() - 1))).to(out.dtype)


class NoiseLevelLabels(torch.nn.Module):
    """A network trained on the labels of GeometricLevels as score_fn(x, sigma): sigma mapped to its
    (fractional) label."""

    def __init__(self, net, levels: GeometricLevels):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x, sigma, *args, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        return model_output_of(self.net(x, self.levels.label(sigma).to(torch.float32), *args, **kwargs))


class EDMPrecond(torch.nn.Module):
    """EDM's denoiser around a raw network F trained with EDMObjective: D(x, sigma) = c_skip x +
    c_out F(c_in x, c_noise), sigma a tensor [B] (or a number)."""

    def __init__(self, net, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x, sigma, *args, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = coefficients.edm_preconditioning(sigma, self.sigma_data)
        shape = (-1,) + (1,) * (x.dim() - 1)
        time = c_noise.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        f = model_output_of(self.net((c_in.reshape(shape) * x.double()).to(x.dtype), time, *args, **kwargs))
        return (c_skip.reshape(shape) * x.double() + c_out.reshape(shape) * f.double()).to(x.dtype)
