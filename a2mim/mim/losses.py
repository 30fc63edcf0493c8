"""A²MIM's losses: the masked spatial loss and the focal frequency loss.

Spatial (SPEC, reference ``mim_head.py``)::

    L_spa = sum(l(x_rec, x) * m_pix) / (sum(m_pix) + 1e-5) / 3

with ``m_pix`` single-channel ``(B, 1, H, W)`` (so the sum counts pixels and ``/ 3`` makes it a
per-element mean), ``l = |d|`` (L1) or ``|d| * tanh(0.1 |d|)`` (the reference's "focal L1" for
ResNet). Visible pixels get no spatial loss.

Frequency (focal frequency loss with ``ave_spectrum=True, log_matrix=True, batch_matrix=True``
as in the reference A²MIM configs)::

    x_hat  = prediction with its unmasked region replaced (see ``unmasked``)
    Fp, Ft = mean over the batch of fft2(x_hat), fft2(x)    (ortho, float32)
    d2     = |Fp - Ft|^2
    w      = log(sqrt(d2) ** alpha + 1) / max(...), NaN -> 0, clamped to [0, 1], detached
    L_freq = mean(w * d2)            (w = 1 for the "w/o omega" ablation)

Two exact savings over the reference, both changing only floating-point rounding:

* the FFT is linear, so ``mean_b fft2(x_hat) - mean_b fft2(x) = fft2(mean_b (x_hat - x))``: one
  FFT of a ``(C, H, W)`` image per frequency batch instead of two of ``(B, C, H, W)``;
* the inputs are real, so ``rfft2`` holds every value of the spectrum once or (its Hermitian
  mirror) twice: weighting the interior columns by 2 and the DC/Nyquist columns by 1 gives the
  same mean, and the same max for ``w``.

``L_freq``'s batch statistics (averaged spectra, max of w) depend on the batch size, so it is
computed as the mean over chunks of ``freq_batch`` images (the reference's per-GPU micro-batch),
making the loss independent of how many images one device holds.
"""

from __future__ import annotations

from typing import Literal

import torch

SpatialLossKind = Literal["l1", "focal_l1"]
UnmaskedMode = Literal["mixed", "detached"]


def spatial_loss(
    residual_bchw: torch.Tensor, mask_b1hw: torch.Tensor, kind: SpatialLossKind = "l1"
) -> torch.Tensor:
    """Masked L1 / focal-L1 of ``residual = x_rec - x``; ``mask_b1hw`` bool, True = masked."""
    d = residual_bchw.abs()
    if kind == "focal_l1":
        d = d * torch.tanh(0.1 * d)
    elif kind != "l1":
        raise ValueError(f"unknown spatial loss {kind!r}; use 'l1' or 'focal_l1'")
    m = mask_b1hw.to(d.dtype)
    return (d * m).sum() / (m.sum() + 1e-5) / d.shape[1]


def frequency_residual(
    residual_bchw: torch.Tensor,
    mask_b1hw: torch.Tensor,
    unmasked: UnmaskedMode = "mixed",
    eps: float = 0.0,
) -> torch.Tensor:
    """``x_hat - x`` for the frequency loss, from ``residual = x_rec - x``.

    With ``m_f = m + (1 - m) * eps``, ``x_hat = x_rec * m_f + x_rep * (1 - m_f)`` where
    ``x_rep = 0.5 * x_rec.detach() + 0.5 * x`` (``"mixed"``, reference code) or
    ``x_rep = x_rec.detach()`` (``"detached"``, paper Eq. 4). In the masked region this is the
    residual itself; in the visible region it is ``eps * r + (1 - eps) * c * r.detach()`` with
    ``c = 0.5`` (mixed) or 1 (detached): the same values and gradients, without copies of x.
    """
    if unmasked == "mixed":
        c = 0.5
    elif unmasked == "detached":
        c = 1.0
    else:
        raise ValueError(f"unknown unmasked mode {unmasked!r}; use 'mixed' or 'detached'")
    visible = residual_bchw.detach() * ((1.0 - eps) * c)
    if eps:
        visible = torch.add(visible, residual_bchw, alpha=eps)
    return torch.where(mask_b1hw, residual_bchw, visible)


def focal_frequency_loss(
    delta_bchw: torch.Tensor,
    alpha: float = 1.0,
    omega: bool = True,
    freq_batch: int | None = None,
) -> torch.Tensor:
    """Focal frequency loss of ``delta = x_hat - x`` (``frequency_residual``), float32.

    Averaged over chunks of ``freq_batch`` images (all images in one chunk when None).
    """
    with torch.autocast(device_type=delta_bchw.device.type, enabled=False):
        delta = delta_bchw.float()
        chunk = delta.shape[0] if freq_batch is None else freq_batch
        losses = [_ffl_of_mean(part.mean(dim=0), alpha, omega) for part in delta.split(chunk)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def _ffl_of_mean(delta_chw: torch.Tensor, alpha: float, omega: bool) -> torch.Tensor:
    c, h, w = delta_chw.shape
    spec = torch.fft.rfft2(delta_chw, norm="ortho")  # (C, H, W // 2 + 1)
    d2 = spec.real.square() + spec.imag.square()
    col_weight = torch.full((spec.shape[-1],), 2.0, device=d2.device)
    col_weight[0] = 1.0
    if w % 2 == 0:
        col_weight[-1] = 1.0
    if omega:
        with torch.no_grad():
            weight = d2.sqrt()
            if alpha != 1.0:
                weight = weight.pow(alpha)
            weight = torch.log(weight + 1.0)
            weight = (weight / weight.max()).nan_to_num_(0.0).clamp_(0.0, 1.0)
        d2 = d2 * weight
    return (d2 * col_weight).sum() / (c * h * w)
