"""Golden tests of the losses against independent naive implementations (explicit DFT sums)."""

from __future__ import annotations

import math

import pytest
import torch

from a2mim.mim.losses import focal_frequency_loss, frequency_residual, spatial_loss
from a2mim.mim.masking import BlockMaskGenerator, upsample_mask


def naive_dft2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DFT of (..., H, W) by explicit sums, float64 complex."""
    h, w = x.shape[-2:]
    m = torch.arange(h, dtype=torch.float64)
    n = torch.arange(w, dtype=torch.float64)
    fh = torch.exp(-2j * math.pi * torch.outer(m, m) / h)  # (k, m)
    fw = torch.exp(-2j * math.pi * torch.outer(n, n) / w)  # (l, n)
    xc = x.to(torch.complex128)
    return torch.einsum("km,...mn,ln->...kl", fh, xc, fw) / math.sqrt(h * w)


def naive_reference_ffl(x_hat, x, alpha=1.0, omega=True):
    """The reference focal frequency loss (ave_spectrum, log_matrix, batch_matrix)."""
    fp = naive_dft2(x_hat).mean(0)
    ft = naive_dft2(x).mean(0)
    d2 = (fp - ft).abs() ** 2
    if omega:
        w = d2.sqrt() ** alpha
        w = torch.log(w + 1.0)
        w = w / w.max()
        w = torch.nan_to_num(w, 0.0).clamp(0, 1).detach()
    else:
        w = torch.ones_like(d2)
    return (w * d2).mean()


def reference_x_hat(x_rec, x, mask, unmasked, eps):
    m = mask.to(x.dtype)
    m_f = m + (1 - m) * eps
    x_rep = 0.5 * x_rec.detach() + 0.5 * x if unmasked == "mixed" else x_rec.detach()
    return x_rec * m_f + x_rep * (1 - m_f)


def _batch(b=6, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)
    x_rec = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)
    grid = BlockMaskGenerator(h, h // 4, 0.6)(b, generator=g)
    mask = upsample_mask(grid, h // 4)[:, None]
    if w != h:
        mask = torch.nn.functional.interpolate(mask.double(), size=(h, w)).bool()
    return x, x_rec, mask


@pytest.mark.parametrize(
    "unmasked,eps,alpha,omega,w",
    [
        ("mixed", 1e-3, 1.0, True, 16),
        ("mixed", 0.0, 1.0, True, 16),
        ("detached", 1e-3, 1.0, True, 16),
        ("mixed", 1e-3, 2.0, True, 16),
        ("mixed", 1e-3, 1.0, False, 16),
        ("mixed", 1e-3, 1.0, True, 15),  # odd width: rfft has no Nyquist column
    ],
)
def test_frequency_loss_matches_naive_dft(unmasked, eps, alpha, omega, w):
    x, x_rec, mask = _batch(w=w)
    ref = naive_reference_ffl(reference_x_hat(x_rec, x, mask, unmasked, eps), x, alpha, omega)
    delta = frequency_residual(x_rec.float() - x.float(), mask, unmasked, eps)
    ours = focal_frequency_loss(delta, alpha=alpha, omega=omega)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=2e-5)


def test_frequency_loss_gradient_matches_reference_formulation():
    x, x_rec, mask = _batch()
    x_rec_ref = x_rec.clone().requires_grad_(True)
    naive_reference_ffl(reference_x_hat(x_rec_ref, x, mask, "mixed", 1e-3), x).backward()
    x_rec_ours = x_rec.clone().requires_grad_(True)
    focal_frequency_loss(frequency_residual(x_rec_ours - x, mask, "mixed", 1e-3)).backward()
    # ours runs in float32 by design: agreement to float32 precision of the largest entry
    scale = x_rec_ref.grad.abs().max()
    assert torch.allclose(x_rec_ours.grad, x_rec_ref.grad, rtol=1e-4, atol=1e-5 * scale)
    # and the visible region gets exactly the eps share of the masked-region gradient scale
    assert (x_rec_ours.grad[~mask.expand_as(x)].abs().max() < 1e-2 * scale).item()


def test_frequency_batch_chunks_average_per_chunk_losses():
    x, x_rec, mask = _batch(b=6)
    chunks = [
        naive_reference_ffl(reference_x_hat(x_rec[s], x[s], mask[s], "mixed", 0.0), x[s])
        for s in (slice(0, 4), slice(4, 6))
    ]
    ours = focal_frequency_loss(frequency_residual(x_rec - x, mask), freq_batch=4)
    assert ours.item() == pytest.approx(torch.stack(chunks).mean().item(), rel=1e-6)


def test_frequency_loss_scales_like_one_over_batch_for_independent_errors():
    # SPEC: for errors that differ between images the term scales like 1/B (batch-averaged
    # spectra), which is why freq_batch exists.
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 3, 32, 32, generator=g)
    small = focal_frequency_loss(delta, freq_batch=8)
    large = focal_frequency_loss(delta, freq_batch=64)
    assert 5.0 < (small / large).item() < 11.0


def test_frequency_loss_is_float32_under_autocast():
    x, x_rec, mask = _batch()
    delta = frequency_residual((x_rec - x).float(), mask)
    ref = focal_frequency_loss(delta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = focal_frequency_loss(delta.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


def test_losses_are_zero_for_a_perfect_prediction():
    x, _, mask = _batch()
    zero = torch.zeros_like(x.float())
    assert spatial_loss(zero, mask).item() == 0.0
    assert spatial_loss(zero, mask, "focal_l1").item() == 0.0
    assert focal_frequency_loss(frequency_residual(zero, mask)).item() == 0.0


def test_spatial_loss_ignores_visible_pixels():
    x, x_rec, mask = _batch()
    r = (x_rec - x).float()
    changed = torch.where(mask, r, r * 10 + 3)
    for kind in ("l1", "focal_l1"):
        assert spatial_loss(r, mask, kind).item() == spatial_loss(changed, mask, kind).item()


def test_spatial_loss_golden_values():
    r = torch.zeros(1, 3, 2, 2)
    r[0, :, 0, 0] = torch.tensor([1.0, -2.0, 3.0])
    r[0, :, 1, 1] = torch.tensor([5.0, 5.0, 5.0])  # visible
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 0, 0, 1] = True  # 2 masked pixels
    assert spatial_loss(r, mask, "l1").item() == pytest.approx(6.0 / (2 + 1e-5) / 3)
    focal = sum(v * math.tanh(0.1 * v) for v in (1.0, 2.0, 3.0))
    assert spatial_loss(r, mask, "focal_l1").item() == pytest.approx(focal / (2 + 1e-5) / 3)
    # the reference's sigmoid form of focal L1: |d| * (2 sigmoid(0.2 |d|) - 1)
    d = torch.linspace(0, 20, 101)
    assert torch.allclose(d * torch.tanh(0.1 * d), d * (2 * torch.sigmoid(0.2 * d) - 1), atol=1e-5)
