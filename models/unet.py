"""A small U-Net denoiser for periodic 2-D fields, with EDM preconditioning (Karras et al. 2022).

``Denoiser(x, sigma, cond=None) -> x0_hat`` in the VE convention x = x0 + sigma n, data in
units where its std is ``sigma_data``:

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4.

F is a U-Net whose convolutions pad circularly (the fields are periodic), with a Fourier
embedding of c_noise added to every residual block. With ``global_modes`` = m > 0 its coarsest
level also mixes channels through the field's lowest Fourier modes (|k_x|, |k_y| <= m), so the
largest scales are estimated from the whole field rather than from a convolution's window.
Optional conditioning channels (e.g. a coarse field upsampled to the grid) are concatenated to
the input. ``models.adapters`` turns the denoiser into a score on the OU clock (process VE,
prediction x0).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from pipeline.choices import NORM_GROUPS


@dataclass(frozen=True)
class UNetConfig:
    """Architecture: ``channels`` per level (each level halves the grid), ``cond_channels``
    extra input channels, ``sigma_data`` the data std the preconditioning assumes."""

    channels: tuple[int, ...] = (32, 64, 96)
    cond_channels: int = 0
    embed: int = 64
    sigma_data: float = 1.0
    global_modes: int = 0  # m of GlobalMix at the coarsest level; 0: none

    def to_dict(self) -> dict:
        """The settings as a sidecar records them, tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """The config a sidecar records; ValueError for a setting this version does not know
        (a newer piadm's checkpoint) or one that is not a table."""
        if not isinstance(d, dict):
            raise ValueError(f"its U-Net settings are {type(d).__name__}, not a table")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"its U-Net has settings this piadm does not know ({', '.join(unknown)}"
                             "): made by a newer piadm?")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="circular")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(NORM_GROUPS, c), c)


class ResBlock(nn.Module):
    """Two circular convolutions with a noise-embedding shift, and a skip connection."""

    def __init__(self, cin: int, cout: int, embed: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
        self.shift = nn.Linear(embed, cout)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W), emb (B, embed) -> (B, cout, H, W): two convolutions, the noise
        level's embedding added between them, and the skip."""
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.shift(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class GlobalMix(nn.Module):
    """h + P(W * FFT(Q h)): a residual channel mix per Fourier mode, for the modes with
    |k_x|, |k_y| <= m of the (periodic) grid. Its receptive field is the whole field, which the
    3x3 convolutions of a shallow U-Net barely reach; the output projection P starts at zero, so
    adding it to a trained network leaves that network's function unchanged."""

    def __init__(self, c: int, modes: int, embed: int, width: int = 32):
        super().__init__()
        self.modes = modes
        self.norm, self.inp = _norm(c), nn.Conv2d(c, width, 1)
        self.scale = nn.Linear(embed, width)
        rows = 2 * modes + 1
        self.weight = nn.Parameter(torch.randn(width, width, rows, modes + 1, 2) / width)
        self.out = nn.Conv2d(width, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h (B, C, H, W), emb (B, embed) -> h plus a learned mix of its lowest Fourier modes
        (the field-wide scales a few convolutions cannot reach), same shape."""
        m, (height, width) = self.modes, h.shape[-2:]
        z = self.inp(nn.functional.silu(self.norm(h))) * (1 + self.scale(emb))[:, :, None, None]
        f = torch.fft.rfft2(z.float(), norm="ortho")  # FFTs and weights in float32 at any dtype
        rows = torch.cat([f[:, :, : m + 1, : m + 1], f[:, :, height - m :, : m + 1]], 2)
        mixed = torch.einsum("bixy,ioxy->boxy", rows, torch.view_as_complex(self.weight.float()))
        g = torch.zeros_like(f)
        g[:, :, : m + 1, : m + 1] = mixed[:, :, : m + 1]
        g[:, :, height - m :, : m + 1] = mixed[:, :, m + 1 :]
        # the k_x = 0 column made Hermitian in k_y, as a real field's is: what the CPU's
        # inverse FFT takes of it anyway, which other FFT libraries (cuFFT) leave undefined
        column = g[..., 0]
        g[..., 0] = (column + torch.roll(column.flip(-1), 1, -1).conj()) / 2
        z = torch.fft.irfft2(g, s=(height, width), norm="ortho").to(h.dtype)
        return h + self.out(z)


class UNet(nn.Module):
    """F(x, c_noise): (B, 1 + cond, H, W), (B,) -> (B, 1, H, W); H, W divisible by
    2^(levels - 1)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, e = cfg.channels, cfg.embed
        self.register_buffer("freqs", torch.randn(e // 2, generator=torch.Generator().manual_seed(0)))
        self.embed = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = _conv(1 + cfg.cond_channels, c[0])
        self.down = nn.ModuleList(ResBlock(a, b, e) for a, b in zip((c[0],) + c[:-1], c))
        self.mid = ResBlock(c[-1], c[-1], e)
        self.mix = GlobalMix(c[-1], cfg.global_modes, e) if cfg.global_modes else None
        self.up = nn.ModuleList(ResBlock(2 * b, a, e) for a, b in zip((c[0],) + c[:-1], c))
        self.out = nn.Sequential(_norm(c[0]), nn.SiLU(), _conv(c[0], 1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """x (B, 1 + cond_channels, H, W), c_noise (B,) -> (B, 1, H, W): EDM's raw network F."""
        angle = 2 * math.pi * c_noise[:, None] * self.freqs[None]
        emb = self.embed(torch.cat([angle.cos(), angle.sin()], 1))
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        if self.mix is not None:
            h = self.mix(h, emb)
        for i, block in reversed(list(enumerate(self.up))):
            h = block(torch.cat([h, skips[i]], 1), emb)
            if i > 0:
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


class Denoiser(nn.Module):
    """EDM-preconditioned D(x, sigma, cond): x (B, H, W), sigma (B,), cond (B, C, H, W) or
    None -> x0_hat (B, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg, self.net = cfg, UNet(cfg)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None):
        """x (B, H, W), sigma (B,), cond (B, C, H, W) or None -> x0_hat (B, H, W)."""
        sd = self.cfg.sigma_data
        s = sigma.to(x.dtype).reshape(-1, 1, 1)
        total = s**2 + sd**2
        c_in, c_skip, c_out = 1 / total.sqrt(), sd**2 / total, s * sd / total.sqrt()
        h = (c_in * x)[:, None]
        if cond is not None:
            h = torch.cat([h, cond.to(x.dtype)], 1)
        f = self.net(h, torch.log(sigma.to(x.dtype)) / 4)[:, 0]
        return c_skip * x + c_out * f
