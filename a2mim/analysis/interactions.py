"""Multi-order interactions between image patches (Deng et al., ICLR 2022; A2MIM Sec. 3.2).

An image is cut into ``n = grid * grid`` players (patches). For a set ``S`` of present players the
model's score is the log-odds of the true class,

    v(S) = logit_y(x_S) - logsumexp_{k != y} logit_k(x_S),

where ``x_S`` keeps the players in ``S`` and sets every other player to 0 (0 in normalised space is
the dataset mean colour). The interaction of players ``i, j`` under context ``S`` is

    Delta(i, j, S) = v(S + i + j) - v(S + i) - v(S + j) + v(S),

``I_m(i, j)`` is the mean of ``Delta`` over random contexts ``S`` of size ``m`` drawn uniformly from
the other ``n - 2`` players, ``I(m)`` is the mean of ``|I_m(i, j)|`` over images and sampled pairs,
and ``J(m) = I(m) / mean_m' I(m')``. Orders are ``m = int((n - 2) * r)`` for the ratios ``r`` of
:data:`DEFAULT_ORDER_RATIOS`; pairs are neighbours (``j`` within ``radius`` cells of ``i``).

Sampling design (shared by both implementations, fixed by :func:`sample_plan`)
-------------------------------------------------------------------------------
* Every image gets its own ``torch.Generator`` seeded from ``(seed, image index)``, so an image's
  pairs and contexts do not depend on which other images were evaluated (this is what makes runs
  resumable and lets two implementations see the very same masked inputs).
* Pairs: ``n_pairs`` distinct unordered pairs drawn uniformly without replacement from all
  neighbour pairs of the grid (Chebyshev distance ``<= radius``).
* Contexts (``shared_contexts=True``, the default): for each (order, context index) one uniform
  random permutation ``pi`` of all ``n`` players is drawn, and pair ``(i, j)`` uses the first ``m``
  players of ``pi`` with ``i`` and ``j`` removed. Removing two fixed players from a uniform
  permutation leaves a uniform permutation of the other ``n - 2`` players, so **each pair's context
  is exactly uniform over the size-``m`` subsets of the other ``n - 2`` players**, and a pair's
  contexts for different context indices are independent. Each pair's ``I_m(i, j)`` estimate thus
  has exactly the distribution of the reference tool's independent draws (same mean, same
  variance); only the errors of different pairs of one image become correlated, which leaves the
  expectation of ``I(m)`` unchanged. What the coupling buys: pairs whose players are both outside
  the prefix see the *same* context ``S``, so ``v(S)`` is one forward for all of them and ``v(S+i)``
  is one forward for all such pairs containing ``i``. With ``shared_contexts=False`` every (order,
  context, pair) draws its own permutation, as the reference tool does.
* Orders ``m = 0`` and ``m = n - 2`` have a single possible context (empty / all other players), so
  all their context draws coincide.

Two implementations
-------------------
:func:`interaction_strength_reference_batched` evaluates the four masked inputs of every
(pair, order, context) in fixed fp32 chunks of 64, like the reference tool. It is the baseline.
:func:`interaction_strength` evaluates each *distinct* masked input of an image once (exact
deduplication of the boolean player masks), under ``torch.inference_mode``, with channels-last
inputs, larger chunks and, for CNNs, a private copy of the model (``torch.fx``; models that cannot
be traced are used unchanged) in which batch-norm is folded into the preceding convolution and
every convolution whose input is only a few cells wide (ResNet's last stages at low resolution:
2x2 and 1x1 maps, mostly zero padding for a 3x3 kernel) becomes the one dense matrix it is on that
input size, where that takes fewer multiply-adds than the convolution. At 224 px no ResNet or
ConvNeXt convolution qualifies, so this only matters for small inputs. It samples the same pairs
and contexts; its estimates differ from the baseline only by fp32 rounding (other batch
compositions, folded batch-norm, another summation order): ``|I_fast(m) - I_ref(m)| <= 1e-4 *
max_m I_ref(m) + 1e-6`` (:data:`FAST_VS_REFERENCE_TOLERANCE`), checked in the tests. Optional
bf16 autocast (``bf16=True``) is faster on CPUs with bf16 units but is *not* covered by that
tolerance: the interaction is a difference of four nearly equal scores and bf16 rounding of the
logits does not cancel in it.

Both functions accept ``state_path``: per-image results are written there atomically after every
image, and a restarted run skips the images already recorded (the file also checks that it
belongs to the same images, model, sampling and implementation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_ORDER_RATIOS: tuple[float, ...] = (
    0.0,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    1.0,
)
"""Ratios ``r`` of the orders ``m = int((n - 2) * r)`` (paper Sec. 3.2 / Fig. 1)."""

FAST_VS_REFERENCE_TOLERANCE: tuple[float, float] = (1e-4, 1e-6)
"""``(rtol, atol)``: ``|I_fast(m) - I_ref(m)| <= rtol * max_m I_ref(m) + atol`` in fp32."""

_STATE_VERSION = 1
_MASKS_PER_CONTEXT = 4  # S, S+i, S+j, S+i+j


@dataclass(frozen=True)
class InteractionSampling:
    """What is sampled: the player grid, orders, pairs and contexts.

    Attributes:
        grid: players per side; the image is cut into ``grid x grid`` cells (14 at 224 px / 16 px).
        order_ratios: ratios ``r`` in [0, 1]; order ``m = int((n - 2) * r)``.
        n_pairs: distinct neighbour pairs per image (reference: 50-200).
        n_contexts: random contexts per (pair, order) (reference: 50-100).
        radius: ``j`` lies within ``radius`` cells of ``i`` in both directions (reference: 2).
        seed: base seed; image ``k`` uses a generator seeded from ``(seed, k)``.
        shared_contexts: couple the contexts of one image's pairs through one permutation per
            (order, context index) (see the module docstring); False draws them independently.
    """

    grid: int = 14
    order_ratios: tuple[float, ...] = DEFAULT_ORDER_RATIOS
    n_pairs: int = 100
    n_contexts: int = 50
    radius: int = 2
    seed: int = 0
    shared_contexts: bool = True

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise ValueError(f"grid={self.grid}: need at least a 2 x 2 grid of players")
        if self.radius < 1:
            raise ValueError(f"radius={self.radius}: pairs need a neighbourhood radius >= 1")
        if not self.order_ratios or any(not 0.0 <= r <= 1.0 for r in self.order_ratios):
            raise ValueError(f"order_ratios={self.order_ratios}: give one or more ratios in [0, 1]")
        if self.n_contexts < 1:
            raise ValueError(f"n_contexts={self.n_contexts}: need at least one context")
        n_local = len(local_pairs(self.grid, self.radius))
        if not 1 <= self.n_pairs <= n_local:
            raise ValueError(
                f"n_pairs={self.n_pairs}: a {self.grid}x{self.grid} grid has {n_local} pairs "
                f"within radius {self.radius}; choose n_pairs in [1, {n_local}]"
            )

    @property
    def n_players(self) -> int:
        """Number of players ``n = grid * grid``."""
        return self.grid * self.grid

    @property
    def orders(self) -> tuple[int, ...]:
        """Context sizes ``m = int((n - 2) * r)`` (a 1e-9 guard absorbs binary rounding)."""
        return tuple(int((self.n_players - 2) * r + 1e-9) for r in self.order_ratios)


@dataclass(frozen=True)
class InteractionPlan:
    """The sampled pairs and contexts of one image.

    Attributes:
        pairs_p2: (P, 2) long, player indices ``i < j`` (row-major on the grid).
        masked_ocpqn: (O, C, P, 4, n) bool, True = player masked (absent, set to 0); the 4 masks
            of each (order, context, pair) keep exactly ``S``, ``S + i``, ``S + j``, ``S + i + j``.
    """

    pairs_p2: Tensor
    masked_ocpqn: Tensor


@dataclass(frozen=True)
class InteractionResult:
    """Multi-order interactions of a set of images.

    Attributes:
        orders: the context sizes ``m``.
        order_ratios: the ratios they came from.
        pairs_bp2: (B, P, 2) long, the sampled pairs of each image.
        pair_interaction_bop: (B, O, P) float64, signed ``I_m(i, j)`` (mean of Delta over contexts).
        n_forwards: model evaluations (images through the network) spent by this call, not
            counting images restored from a state file.
    """

    orders: tuple[int, ...]
    order_ratios: tuple[float, ...]
    pairs_bp2: Tensor
    pair_interaction_bop: Tensor
    n_forwards: int

    @property
    def strength_o(self) -> Tensor:
        """(O,) float64, ``I(m)``: mean over images and pairs of ``|I_m(i, j)|``."""
        return self.pair_interaction_bop.abs().mean(dim=(0, 2))

    @property
    def relative_strength_o(self) -> Tensor:
        """(O,) float64, ``J(m) = I(m) / mean_m' I(m')``; all zeros when every ``I(m)`` is 0."""
        strength_o = self.strength_o
        total = strength_o.mean()
        return strength_o / total if total > 0 else torch.zeros_like(strength_o)


def local_pairs(grid: int, radius: int) -> Tensor:
    """All unordered neighbour pairs of a ``grid x grid`` board.

    Returns:
        (L, 2) long, rows ``(i, j)`` with ``i < j`` and both row and column offsets ``<= radius``.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    near_nn = ((rows[:, None] - rows[None, :]).abs() <= radius) & (
        (cols[:, None] - cols[None, :]).abs() <= radius
    )
    return torch.nonzero(torch.triu(near_nn, diagonal=1))


def image_generator(seed: int, image_index: int) -> torch.Generator:
    """The CPU generator of image ``image_index`` (independent of every other image)."""
    digest = hashlib.sha256(f"a2mim-interactions:{seed}:{image_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_plan(sampling: InteractionSampling, image_index: int) -> InteractionPlan:
    """Draw the pairs and contexts of one image (see the module docstring for the design)."""
    generator = image_generator(sampling.seed, image_index)
    n, n_pairs, n_contexts = sampling.n_players, sampling.n_pairs, sampling.n_contexts
    candidates_l2 = local_pairs(sampling.grid, sampling.radius)
    pick = torch.randperm(len(candidates_l2), generator=generator)[:n_pairs]
    pairs_p2 = candidates_l2[pick]
    one_hot_i_pn = F.one_hot(pairs_p2[:, 0], n).bool()
    one_hot_j_pn = F.one_hot(pairs_p2[:, 1], n).bool()

    per_order = []
    for m in sampling.orders:
        n_draws = 1 if sampling.shared_contexts else n_pairs
        keys = torch.rand(n_contexts, n_draws, n, generator=generator, dtype=torch.float64)
        order_cpn = keys.argsort(dim=-1).expand(n_contexts, n_pairs, n)  # players in drawn order
        excluded_cpn = (order_cpn == pairs_p2[None, :, :1]) | (order_cpn == pairs_p2[None, :, 1:])
        allowed_cpn = ~excluded_cpn
        chosen_cpn = allowed_cpn & (allowed_cpn.cumsum(dim=-1) <= m)
        context_cpn = torch.zeros(n_contexts, n_pairs, n, dtype=torch.bool)
        context_cpn.scatter_(-1, order_cpn, chosen_cpn)
        with_i_cpn = context_cpn | one_hot_i_pn
        with_j_cpn = context_cpn | one_hot_j_pn
        present_cpqn = torch.stack(
            [context_cpn, with_i_cpn, with_j_cpn, with_i_cpn | one_hot_j_pn], dim=2
        )
        per_order.append(~present_cpqn)
    return InteractionPlan(pairs_p2=pairs_p2, masked_ocpqn=torch.stack(per_order))


def log_odds(logits_bk: Tensor, labels_b: Tensor) -> Tensor:
    """(B,) ``v = logit_y - logsumexp(other logits)`` = log p_y / (1 - p_y), in float32 or wider."""
    if logits_bk.shape[1] < 2:
        raise ValueError(f"log-odds need at least 2 classes, got logits of shape {logits_bk.shape}")
    logits_bk = logits_bk.to(torch.promote_types(logits_bk.dtype, torch.float32))
    labels_b1 = labels_b[:, None]
    target_b = logits_bk.gather(1, labels_b1).squeeze(1)
    others_bk = logits_bk.scatter(1, labels_b1, float("-inf"))
    return target_b - torch.logsumexp(others_bk, dim=1)


def mask_players(img_chw: Tensor, masked_bn: Tensor, grid: int) -> Tensor:
    """Set the masked players of one image to 0 (the mean colour in normalised space).

    Args:
        img_chw: (C, H, W) normalised image; H and W divisible by ``grid``.
        masked_bn: (B, n) bool, True = player masked, players in row-major grid order.
        grid: players per side, ``n = grid * grid``.

    Returns:
        (B, C, H, W) masked copies.
    """
    c, h, w = img_chw.shape
    cells = img_chw.reshape(1, c, grid, h // grid, grid, w // grid)
    keep = (~masked_bn).reshape(-1, 1, grid, 1, grid, 1).to(img_chw.dtype)
    return (cells * keep).reshape(-1, c, h, w)


def pair_interactions(values_ocpq: Tensor) -> Tensor:
    """(O, P) float64 ``I_m(i, j)`` from (O, C, P, 4) scores of ``S, S+i, S+j, S+i+j``."""
    v = values_ocpq.double()
    delta_ocp = v[..., 3] - v[..., 1] - v[..., 2] + v[..., 0]
    return delta_ocp.mean(dim=1)


def interaction_strength_reference_batched(
    model: nn.Module,
    images_bchw: Tensor,
    labels_b: Tensor,
    sampling: InteractionSampling,
    *,
    chunk_size: int = 64,
    device: str | torch.device | None = None,
    state_path: str | os.PathLike[str] | None = None,
) -> InteractionResult:
    """Baseline: four fp32 forwards per (image, pair, order, context), fixed chunks of 64.

    Args:
        model: classifier, (B, 3, H, W) normalised images -> (B, K) logits, K >= 2. It is put in
            eval mode for the call (its previous mode is restored).
        images_bchw: (B, 3, H, W) normalised images, H and W divisible by ``sampling.grid``.
        labels_b: (B,) long true classes.
        sampling: pairs, orders and contexts to draw.
        chunk_size: masked images per forward.
        device: where to run; None = the device of the model's parameters (the model is not moved).
        state_path: JSON file of per-image results for resuming long runs (see module docstring).

    Returns:
        :class:`InteractionResult`.
    """

    def evaluate(img_chw: Tensor, label: Tensor, plan: InteractionPlan) -> tuple[Tensor, int]:
        masked_rn = plan.masked_ocpqn.reshape(-1, sampling.n_players)
        values = []
        with torch.no_grad():
            for start in range(0, len(masked_rn), chunk_size):
                x_bchw = mask_players(
                    img_chw,
                    masked_rn[start : start + chunk_size].to(img_chw.device),
                    sampling.grid,
                )
                values.append(log_odds(model(x_bchw), label.expand(len(x_bchw))).cpu())
        return torch.cat(values).reshape(plan.masked_ocpqn.shape[:4]), len(masked_rn)

    return _run(
        "reference_batched",
        model,
        images_bchw,
        labels_b,
        sampling,
        evaluate,
        chunk_size=chunk_size,
        device=device,
        state_path=state_path,
        settings={"chunk_size": chunk_size},
    )


def interaction_strength(
    model: nn.Module,
    images_bchw: Tensor,
    labels_b: Tensor,
    sampling: InteractionSampling,
    *,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
    state_path: str | os.PathLike[str] | None = None,
    fold_batchnorm: bool = True,
    dense_small_convs: bool = True,
    channels_last: bool = True,
    bf16: bool = False,
) -> InteractionResult:
    """Fast estimate of the same quantity as :func:`interaction_strength_reference_batched`.

    Every distinct masked input of an image is evaluated once (the coupled contexts make many
    coincide, and orders 0 and n - 2 have a single context), under ``torch.inference_mode``.
    Arguments as in the baseline, plus:

    Args:
        chunk_size: masked images per forward.
        fold_batchnorm: evaluate a private ``torch.fx`` copy of the model with eval-mode
            batch-norm folded into the preceding convolutions (falls back to the model itself, with
            a warning, when it cannot be traced).
        dense_small_convs: in that copy, replace each ``nn.Conv2d`` by the equivalent dense
            matrix on its (fixed) input size where that needs fewer multiply-adds
            (see the module docstring).
        channels_last: feed channels-last inputs (faster convolutions on CPU).
        bf16: autocast to bfloat16 (not covered by :data:`FAST_VS_REFERENCE_TOLERANCE`).

    Returns:
        :class:`InteractionResult`; ``n_forwards`` counts distinct masked inputs evaluated.
    """
    folded = _fold_batchnorm(model) if fold_batchnorm else model
    # a model that could not be traced for folding is not traced again (one warning)
    fold_failed = fold_batchnorm and folded is model and _has_batchnorm(model)
    densify = dense_small_convs and not fold_failed
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    built: dict[tuple[int, ...], nn.Module] = {}  # per input shape (dense matrices depend on it)

    def evaluate(img_chw: Tensor, label: Tensor, plan: InteractionPlan) -> tuple[Tensor, int]:
        shape = tuple(img_chw.shape)
        if shape not in built:
            built[shape] = (
                _dense_small_convs(folded, img_chw[None], warn_stacklevel=4) if densify else folded
            )
        forward_model = built[shape]
        masked_rn = plan.masked_ocpqn.reshape(-1, sampling.n_players)
        first_u, inverse_r = _unique_rows(masked_rn)
        unique_un = masked_rn[first_u].to(img_chw.device)
        values = []
        with (
            torch.inference_mode(),
            torch.autocast(img_chw.device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            for start in range(0, len(unique_un), chunk_size):
                x_bchw = mask_players(img_chw, unique_un[start : start + chunk_size], sampling.grid)
                logits_bk = forward_model(x_bchw.contiguous(memory_format=memory_format))
                values.append(log_odds(logits_bk, label.expand(len(x_bchw))).cpu())
        values_u = torch.cat(values)
        return values_u[inverse_r].reshape(plan.masked_ocpqn.shape[:4]), len(unique_un)

    return _run(
        "fast",
        model,
        images_bchw,
        labels_b,
        sampling,
        evaluate,
        chunk_size=chunk_size,
        device=device,
        state_path=state_path,
        settings={
            "chunk_size": chunk_size,
            "fold_batchnorm": fold_batchnorm,
            "dense_small_convs": dense_small_convs,
            "channels_last": channels_last,
            "bf16": bf16,
        },
    )


def _unique_rows(rows_rn: Tensor) -> tuple[Tensor, Tensor]:
    """Exact deduplication of boolean rows.

    Args:
        rows_rn: (R, n) bool.

    Returns:
        first_u: (U,) long, index of the first occurrence of each distinct row.
        inverse_r: (R,) long, ``rows_rn[first_u][inverse_r] == rows_rn``.
    """
    n_rows, n = rows_rn.shape
    bits_per_word = 62
    n_words = -(-n // bits_per_word)
    bits = F.pad(rows_rn, (0, n_words * bits_per_word - n)).reshape(n_rows, n_words, -1)
    weights = 2 ** torch.arange(bits_per_word, dtype=torch.int64)
    keys_rw = (bits.long() * weights).sum(dim=-1)
    _, inverse_r = torch.unique(keys_rw, dim=0, return_inverse=True)
    n_unique = int(inverse_r.max()) + 1
    first_u = torch.full((n_unique,), n_rows, dtype=torch.long)
    first_u.scatter_reduce_(0, inverse_r, torch.arange(n_rows), reduce="amin")
    return first_u, inverse_r


class _DenseConv(nn.Module):
    """A convolution on one fixed input size as one dense matrix: ``(B, C, H, W)`` ->
    ``(B, C', H', W')`` by ``x.flatten(1) @ weight.T + bias``; same map, other summation order."""

    def __init__(self, conv: nn.Conv2d, in_chw: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = in_chw
        weight, bias = conv.weight.detach(), conv.bias
        with torch.no_grad():
            basis_kchw = torch.eye(c * h * w, dtype=weight.dtype, device=weight.device)
            response_kdhw = F.conv2d(
                basis_kchw.reshape(-1, c, h, w),
                weight,
                None,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
        self.out_chw = tuple(response_kdhw.shape[1:])
        self.register_buffer("weight", response_kdhw.reshape(c * h * w, -1).t().contiguous())
        bias_d = torch.zeros_like(weight[:, 0, 0, 0]) if bias is None else bias.detach()
        self.register_buffer("bias", bias_d[:, None, None].expand(self.out_chw).flatten().clone())

    def forward(self, x_bchw: Tensor) -> Tensor:
        y_bn = F.linear(x_bchw.reshape(len(x_bchw), -1), self.weight, self.bias)
        return y_bn.reshape(len(x_bchw), *self.out_chw)


_DENSE_MAX_INPUTS = 4096  # at most c*h*w inputs per densified convolution (bounds its matrix)


def _dense_small_convs(
    model: nn.Module, example_bchw: Tensor, warn_stacklevel: int = 2
) -> nn.Module:
    """A ``torch.fx`` copy of ``model`` whose ``nn.Conv2d`` layers become dense matrices on the
    input sizes seen for ``example_bchw`` wherever that needs no more multiply-adds than the
    convolution and the input has at most 4096 values (e.g. a 3x3 convolution on a 1x1 or 2x2
    map, where most of its taps hit zero padding). Only valid for inputs of that size; the
    model itself is never changed. Falls back to ``model`` with a warning if it cannot be traced.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    if not any(type(m) is nn.Conv2d for m in model.modules()):
        return model
    try:
        graph_module = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_bchw)
    except Exception as error:  # tracing failures come in many exception types
        warnings.warn(
            f"could not trace the model to densify small convolutions ({type(error).__name__}: "
            f"{error}); evaluating it unchanged (pass dense_small_convs=False to silence this)",
            stacklevel=warn_stacklevel,
        )
        return model
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            continue
        in_shape = node.args[0].meta["tensor_meta"].shape
        out_shape = node.meta["tensor_meta"].shape
        n_in, n_out = math.prod(in_shape[1:]), math.prod(out_shape[1:])
        conv_macs = n_out * conv.weight[0].numel()
        if n_in > _DENSE_MAX_INPUTS or n_in * n_out > conv_macs:
            continue
        parent, _, name = node.target.rpartition(".")
        owner = graph_module.get_submodule(parent) if parent else graph_module
        setattr(owner, name, _DenseConv(conv, tuple(in_shape[1:])))
    graph_module.recompile()
    return graph_module


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A traced copy of ``model`` with eval-mode conv + batch-norm pairs folded, or ``model``."""
    from torch.fx.experimental.optimization import fuse

    if not _has_batchnorm(model):
        return model
    was_training = model.training
    model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception as error:  # tracing failures come in many exception types
        warnings.warn(
            f"could not fold batch-norm into convolutions ({type(error).__name__}: {error}); "
            "evaluating the model unchanged (pass fold_batchnorm=False to silence this)",
            stacklevel=3,
        )
        return model
    finally:
        model.train(was_training)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    tensors = [*model.parameters(), *model.buffers()]
    model_device = tensors[0].device if tensors else None
    if device is None:
        return model_device or torch.device("cpu")
    device = torch.device(device)
    if model_device is not None and model_device.type != device.type:
        raise ValueError(
            f"device={device} but the model lives on {model_device}; move the model first "
            f"(model.to('{device}')) or pass device=None"
        )
    return device


def _fingerprint(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous()
        digest.update(str((array.dtype, tuple(array.shape))).encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _run(
    implementation: str,
    model: nn.Module,
    images_bchw: Tensor,
    labels_b: Tensor,
    sampling: InteractionSampling,
    evaluate: Callable[[Tensor, Tensor, InteractionPlan], tuple[Tensor, int]],
    *,
    chunk_size: int,
    device: str | torch.device | None,
    state_path: str | os.PathLike[str] | None,
    settings: dict,
) -> InteractionResult:
    """Loop over images, reusing and extending the state file; shared by both implementations."""
    if images_bchw.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images_bchw.shape)}")
    n_images, _, height, width = images_bchw.shape
    if height % sampling.grid or width % sampling.grid:
        raise ValueError(
            f"image size {height}x{width} is not divisible by grid={sampling.grid}; "
            "resize the images or choose a grid that divides both sides"
        )
    if labels_b.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},), got {tuple(labels_b.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    device = _model_device(model, device)

    header, done = {}, {}
    if state_path is not None:
        header_fields = {
            "version": _STATE_VERSION,
            "implementation": implementation,
            "settings": settings,
            "sampling": asdict(sampling),
            "images": _fingerprint(images_bchw, labels_b),
            "model": _fingerprint(*model.state_dict().values()),
        }
        header = json.loads(json.dumps(header_fields))  # compare as stored (tuples -> lists)
        done = _load_state(Path(state_path), header)

    pairs, interactions, n_forwards = [], [], 0
    with _eval_mode(model):
        for index in range(n_images):
            if index in done:
                pairs_p2, interaction_op = done[index]
            else:
                plan = sample_plan(sampling, index)
                img_chw = images_bchw[index].to(device)
                label = labels_b[index : index + 1].to(device)
                values_ocpq, spent = evaluate(img_chw, label, plan)
                pairs_p2, interaction_op = plan.pairs_p2, pair_interactions(values_ocpq)
                n_forwards += spent
                if state_path is not None:
                    done[index] = (pairs_p2, interaction_op)
                    _save_state(Path(state_path), header, done)
            pairs.append(pairs_p2)
            interactions.append(interaction_op)
    return InteractionResult(
        orders=sampling.orders,
        order_ratios=sampling.order_ratios,
        pairs_bp2=torch.stack(pairs),
        pair_interaction_bop=torch.stack(interactions),
        n_forwards=n_forwards,
    )


def _load_state(path: Path, header: dict) -> dict[int, tuple[Tensor, Tensor]]:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read interaction state file {path} ({error}); delete it to start afresh"
        ) from error
    mismatched = [key for key, value in header.items() if state.get("header", {}).get(key) != value]
    if mismatched:
        raise ValueError(
            f"interaction state file {path} was written for a different {', '.join(mismatched)}; "
            "delete it or pass another state_path"
        )
    return {
        int(index): (
            torch.tensor(record["pairs"], dtype=torch.long),
            torch.tensor(record["pair_interaction"], dtype=torch.float64),
        )
        for index, record in state["done"].items()
    }


def _save_state(path: Path, header: dict, done: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Write the state as JSON (float64 round-trips exactly) via a temp file and rename."""
    state = {
        "header": header,
        "done": {
            str(index): {"pairs": pairs_p2.tolist(), "pair_interaction": interaction_op.tolist()}
            for index, (pairs_p2, interaction_op) in sorted(done.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as tmp:
            json.dump(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
