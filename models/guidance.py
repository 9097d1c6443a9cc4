"""Autoguidance: a trained denoiser steered away from a weaker version of itself.

A small or briefly trained network errs the way a larger, longer trained one does, only more:
both regress towards blurred, low-energy fields where the data are hard to predict (here the
filaments between vortices, drawn at intermediate noise levels). Extrapolating from the weak
denoiser D_w through the strong one D_s,

    D(x; sigma) = D_w(x; sigma) + g (D_s(x; sigma) - D_w(x; sigma)),    g >= 1,

cancels part of that shared error (Karras et al., "Guiding a diffusion model with a bad version
of itself", NeurIPS 2024). g = 1 is the strong network alone. The score is affine in the
denoiser, so the same combination holds for the score; it costs one call of the weak network
per call. Both networks must have been trained on the same data in the same normalised units,
or their difference measures the units and not the error (``models.learned.load_unet``
checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guided:
    """D = weak + guidance (strong - weak) for two denoisers with the signature
    (x (B, *S), sigma (B,), cond (B, C, *S) or None) -> x0_hat (B, *S)."""

    strong: object
    weak: object
    guidance: float

    @property
    def cfg(self):
        """The strong network's architecture (what the rest of piadm asks of a denoiser)."""
        return self.strong.cfg

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        weak = self.weak(x, sigma, cond)
        return torch.lerp(weak, self.strong(x, sigma, cond), self.guidance)
