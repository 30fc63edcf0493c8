"""Does ``torch.compile`` pay off for the A²MIM training step on this machine?

Times the compile (first two steps) and then, interleaved, eager and compiled training steps
(forward, backward, AdamW) of one preset on the same batch; prints the compile time, the median
step times and, as the last line, ``eager_over_compiled=<median of per-round ratios>`` (> 1: the
compiled step is faster).

    python benchmarks/compile_step.py                                # a2mim_resnet18, batch 64
    python benchmarks/compile_step.py --preset a2mim_vit_base --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from a2mim.mim import MaskedImageModel, get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="a2mim_resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MaskedImageModel(get_preset(args.preset)).to(device).train()
    size = model.cfg.img_size
    img = torch.randn(args.batch, 3, size, size, device=device)
    mask = model.masker(args.batch, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(forward) -> float:
        sync()
        start = time.perf_counter()
        loss = forward(img, mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    start = time.perf_counter()
    compiled = torch.compile(model)
    step(compiled)
    step(compiled)
    print(
        f"{args.preset} batch={args.batch} device={device}: compile + 2 steps "
        f"{time.perf_counter() - start:.1f} s"
    )
    step(model)
    eager_t, compiled_t = [], []
    for _ in range(args.rounds):
        eager_t.append(step(model))
        compiled_t.append(step(compiled))
    print(
        f"eager {1e3 * statistics.median(eager_t):.0f} ms/step, "
        f"compiled {1e3 * statistics.median(compiled_t):.0f} ms/step"
    )
    ratio = statistics.median(e / c for e, c in zip(eager_t, compiled_t, strict=True))
    print(f"eager_over_compiled={ratio:.3f}")


if __name__ == "__main__":
    main()
