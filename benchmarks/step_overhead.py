"""How much does A²MIM cost on top of the work any masked-image-modeling step must do?

For ResNet-50 and ViT-S (the reference 768-d/8-block geometry of ``a2mim_vit_small``) at 224 px
on the CPU, in one run and interleaved (A B C A B C ...), this times training steps
(forward, backward, AdamW step) of:

* ``a2mim``: the full A²MIM model (mask drawing, RGB-mean fill, mask token, decoder, spatial loss
  and focal frequency loss);
* ``floor``: the bare timm backbone on the same batch + the same 1x1-conv/PixelShuffle decoder +
  plain masked L1 against a precomputed mask (the unavoidable work);
* ``backbone``: the bare backbone alone (``forward_features`` + a mean, backward, step);
* ``freq``: the frequency loss alone (residual mixing, rFFT loss, its backward) on that batch.

It prints median times and the ratios (a) a2mim / floor, (b) a2mim / backbone and
(c) freq / a2mim, with the last line
``overhead_ratio_resnet50=<a1> overhead_ratio_vit_small=<a2> vs_backbone_max=<b> freq_share_max=<c>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from a2mim.mim import MaskedImageModel, get_preset
from a2mim.mim.losses import focal_frequency_loss, frequency_residual
from a2mim.mim.masking import upsample_mask


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(preset: str, batch: int, rounds: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MaskedImageModel(get_preset(preset)).train()
    cfg = model.cfg
    img = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    gen = torch.Generator().manual_seed(0)
    mask_pix = upsample_mask(model.masker(batch, generator=gen), cfg.mask_patch_size)[:, None]

    opt_full = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    enc, dec = model.encoder, model.decoder
    opt_floor = torch.optim.AdamW(list(enc.parameters()) + list(dec.parameters()), lr=1e-4)
    opt_bb = torch.optim.AdamW(enc.parameters(), lr=1e-4)

    def step_a2mim():
        out = model(img, generator=gen)
        opt_full.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_full.step()

    def step_floor():
        pred = dec(model.adapter.final_to_bchw(enc.forward_features(img)))
        m = mask_pix.to(pred.dtype)
        loss = ((pred - img).abs() * m).sum() / (m.sum() + 1e-5) / 3
        opt_floor.zero_grad(set_to_none=True)
        loss.backward()
        opt_floor.step()

    def step_backbone():
        loss = enc.forward_features(img).float().mean()
        opt_bb.zero_grad(set_to_none=True)
        loss.backward()
        opt_bb.step()

    residual = torch.randn_like(img, requires_grad=True)

    def freq_only():
        delta = frequency_residual(residual, mask_pix, cfg.freq_unmasked, cfg.freq_eps)
        loss = focal_frequency_loss(delta, cfg.freq_alpha, cfg.freq_omega, cfg.freq_batch)
        (grad,) = torch.autograd.grad(loss, residual)
        return grad

    variants = {
        "a2mim": step_a2mim,
        "floor": step_floor,
        "backbone": step_backbone,
        "freq": freq_only,
    }
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios per round (paired), then the median: robust to drifts in machine load.
    paired = {
        "a": statistics.median(a / f for a, f in zip(times["a2mim"], times["floor"], strict=True)),
        "b": statistics.median(
            a / b for a, b in zip(times["a2mim"], times["backbone"], strict=True)
        ),
        "c": statistics.median(f / a for f, a in zip(times["freq"], times["a2mim"], strict=True)),
    }
    return {**{f"t_{k}": v for k, v in med.items()}, **paired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "vit_small"],
        choices=["resnet50", "vit_small"],
        help="which backbones to time (default both)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    presets = {"resnet50": "a2mim_resnet50", "vit_small": "a2mim_vit_small"}
    for label in args.models:
        r = measure(presets[label], args.batch, args.rounds, args.warmup)
        results[label] = r
        print(
            f"{label:10s} batch={args.batch} threads={torch.get_num_threads()} "
            f"a2mim={r['t_a2mim'] * 1e3:8.1f} ms  floor={r['t_floor'] * 1e3:8.1f} ms  "
            f"backbone={r['t_backbone'] * 1e3:8.1f} ms  freq={r['t_freq'] * 1e3:6.2f} ms  "
            f"(a) a2mim/floor={r['a']:.3f}  (b) a2mim/backbone={r['b']:.3f}  "
            f"(c) freq share={r['c'] * 100:.2f}%",
            flush=True,
        )
    ratios = " ".join(f"overhead_ratio_{k}={r['a']:.3f}" for k, r in results.items())
    print(
        f"{ratios} "
        f"vs_backbone_max={max(r['b'] for r in results.values()):.3f} "
        f"freq_share_max={max(r['c'] for r in results.values()):.4f}"
    )


if __name__ == "__main__":
    main()
