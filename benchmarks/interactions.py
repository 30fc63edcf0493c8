"""How much faster is the fast multi-order interaction estimator than the plain batched baseline?

In one process, on one randomly initialised timm model and the same sampled pairs and contexts,
this times :func:`a2mim.analysis.interactions.interaction_strength_reference_batched` (four fp32
forwards per (image, pair, order, context), chunks of 64) and
:func:`a2mim.analysis.interactions.interaction_strength` (each distinct masked input once,
inference mode, channels-last, batch-norm folded, convolutions on 2x2 / 1x1 maps as dense
matrices, chunks of 256), interleaved for a few rounds
(the order alternates between rounds). It prints the median times, the forwards each spent, the
largest differences between their estimates (checked against ``FAST_VS_REFERENCE_TOLERANCE``)
and, as the last line, ``speedup=<median baseline time / median fast time>``.

    .venv/bin/python benchmarks/interactions.py                       # resnet18, 32 px, 8x8 grid
    .venv/bin/python benchmarks/interactions.py --pairs 32            # sparser pairs: less sharing
    .venv/bin/python benchmarks/interactions.py --model vit_tiny_patch16_224 --img-size 32

The speedup grows with the number of pairs per player (pairs sharing a player share the
``v(S + i)`` forwards); at ``--pairs`` equal to the number of players it is about 2.2x from
deduplication alone, times the gain of the leaner forward (about 1.5x for ResNet-18 at 32 px,
most of it from the dense last stages; at 224 px no convolution is small enough to densify).
The default run takes about 1.5 min on an idle core (the baseline is ~75 % of it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from a2mim.analysis.interactions import (
    FAST_VS_REFERENCE_TOLERANCE,
    InteractionSampling,
    interaction_strength,
    interaction_strength_reference_batched,
)


def build_model(name: str, img_size: int, n_classes: int) -> torch.nn.Module:
    """A randomly initialised timm classifier for ``img_size`` inputs."""
    try:
        model = timm.create_model(name, pretrained=False, num_classes=n_classes, img_size=img_size)
    except TypeError:  # CNNs take any input size and have no img_size argument
        model = timm.create_model(name, pretrained=False, num_classes=n_classes)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=8, help="players per side")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64, help="pairs per image")
    parser.add_argument("--contexts", type=int, default=8, help="contexts per (pair, order)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (info only)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_classes = 10
    model = build_model(args.model, args.img_size, n_classes)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, n_classes, (args.images,), generator=generator)
    sampling = InteractionSampling(
        grid=args.grid, n_pairs=args.pairs, n_contexts=args.contexts, seed=args.seed
    )
    print(
        f"model={args.model} img_size={args.img_size} grid={args.grid} images={args.images} "
        f"pairs={args.pairs} contexts={args.contexts} orders={len(sampling.orders)} "
        f"threads={args.threads} torch={torch.__version__}"
    )

    runs = {
        "baseline": lambda: interaction_strength_reference_batched(model, images, labels, sampling),
        "fast": lambda: interaction_strength(model, images, labels, sampling),
    }
    if args.bf16:
        runs["fast_bf16"] = lambda: interaction_strength(model, images, labels, sampling, bf16=True)
    warm = InteractionSampling(grid=args.grid, n_pairs=2, n_contexts=1, seed=args.seed)
    interaction_strength_reference_batched(model, images[:1], labels[:1], warm)
    interaction_strength(model, images[:1], labels[:1], warm)

    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}  # less sensitive to load
    results = {}
    for round_index in range(args.rounds):
        names = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in names:
            start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        print(f"round {round_index}: " + " ".join(f"{n}={times[n][-1]:.2f}s" for n in runs))

    baseline, fast = results["baseline"], results["fast"]
    scale = float(baseline.strength_o.max())
    rtol, atol = FAST_VS_REFERENCE_TOLERANCE
    for name in runs:
        result = results[name]
        median = statistics.median(times[name])
        diff_strength = float((result.strength_o - baseline.strength_o).abs().max())
        diff_pairs = float(
            (result.pair_interaction_bop - baseline.pair_interaction_bop).abs().max()
        )
        bound = rtol * scale + atol
        diff_relative = float(
            (result.relative_strength_o - baseline.relative_strength_o).abs().max()
        )
        print(
            f"{name}: median {median:.2f}s, forwards {result.n_forwards} "
            f"({1e3 * median / result.n_forwards:.3f} ms each), "
            f"max |dI(m)| {diff_strength:.3e} ({diff_strength / scale:.2e} of max I(m)), "
            f"max |dI_m(i,j)| {diff_pairs:.3e}, max |dJ(m)| {diff_relative:.2e}, within "
            f"tolerance: {diff_strength <= bound and diff_pairs <= bound}"
        )
    print("I(m)  baseline:", " ".join(f"{v:.3e}" for v in baseline.strength_o.tolist()))
    print("J(m)  baseline:", " ".join(f"{v:.3f}" for v in baseline.relative_strength_o.tolist()))
    print("J(m)  fast:    ", " ".join(f"{v:.3f}" for v in fast.relative_strength_o.tolist()))
    print(f"forward_ratio={baseline.n_forwards / fast.n_forwards:.2f}")
    cpu_ratio = statistics.median(cpu_times["baseline"]) / statistics.median(cpu_times["fast"])
    print(f"cpu_time_ratio={cpu_ratio:.2f} (process CPU time; wall time below)")
    speedup = statistics.median(times["baseline"]) / statistics.median(times["fast"])
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
