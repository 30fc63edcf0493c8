"""Multi-order interactions: known answers on models with additive, pairwise and three-way terms,
the sampling design, fast vs baseline agreement, and resumable runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from a2mim.analysis.interactions import (
    FAST_VS_REFERENCE_TOLERANCE,
    InteractionSampling,
    interaction_strength,
    interaction_strength_reference_batched,
    local_pairs,
    log_odds,
    sample_plan,
)

GRID = 4
SIZE = 16  # 4 x 4 pixel players
IMPLEMENTATIONS = [interaction_strength_reference_batched, interaction_strength]


class PlayerScoreModel(nn.Module):
    """Two logits ``[score(z), 0]`` where ``z`` (B, n) holds the mean of every player's pixels.

    With label 0 the log-odds are exactly ``score(z)``, so interactions follow from ``score``.
    """

    def __init__(self, score):
        super().__init__()
        self.score = score

    def forward(self, x_bchw):
        z_bn = F.avg_pool2d(x_bchw.mean(dim=1, keepdim=True), SIZE // GRID).flatten(1)
        score_b = self.score(z_bn)
        return torch.stack([score_b, torch.zeros_like(score_b)], dim=1)


def blocky_images(n_images, generator):
    """(B, 3, 16, 16) images, constant on each player, with dyadic values (exact arithmetic)."""
    cells = torch.randint(-8, 9, (n_images, 1, GRID, GRID), generator=generator) / 4
    return (
        cells.repeat_interleave(SIZE // GRID, 2)
        .repeat_interleave(SIZE // GRID, 3)
        .expand(-1, 3, -1, -1)
    )


def all_pairs_sampling(**overrides):
    """Sample every neighbour pair so that any pair of interest is present."""
    n_local = len(local_pairs(GRID, 2))
    return InteractionSampling(**{"grid": GRID, "n_pairs": n_local, "n_contexts": 3, **overrides})


def pair_column(pairs_p2, i, j):
    matches = ((pairs_p2[:, 0] == min(i, j)) & (pairs_p2[:, 1] == max(i, j))).nonzero()
    assert len(matches) == 1, f"pair ({i}, {j}) not sampled"
    return int(matches[0])


def test_log_odds_is_log_p_over_one_minus_p():
    logits_bk = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels_b = torch.tensor([0, 2])
    p_b = logits_bk.softmax(dim=1)[torch.arange(2), labels_b]
    torch.testing.assert_close(log_odds(logits_bk, labels_b), torch.log(p_b / (1 - p_b)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_additive_model_has_zero_interaction_at_every_order(implementation):
    weights_n = torch.arange(GRID * GRID, dtype=torch.float32) / 8 - 1
    model = PlayerScoreModel(lambda z_bn: z_bn @ weights_n)
    images = blocky_images(2, torch.Generator().manual_seed(1))
    result = implementation(model, images, torch.zeros(2, dtype=torch.long), all_pairs_sampling())
    assert torch.equal(result.strength_o, torch.zeros(13, dtype=torch.float64))
    assert torch.equal(result.relative_strength_o, torch.zeros(13, dtype=torch.float64))

    # Generic (non-dyadic) inputs: zero up to fp32 rounding.
    noisy = images + torch.rand(images.shape, generator=torch.Generator().manual_seed(2))
    result = implementation(model, noisy, torch.zeros(2, dtype=torch.long), all_pairs_sampling())
    assert result.strength_o.max() < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pairwise_product_interacts_only_for_its_pair(implementation):
    p, q, a = 5, 10, 1.5  # (1, 1) and (2, 2) on the 4 x 4 grid: neighbours
    weights_n = torch.linspace(-1, 1, GRID * GRID)
    model = PlayerScoreModel(lambda z_bn: z_bn @ weights_n + a * z_bn[:, p] * z_bn[:, q])
    images = blocky_images(2, torch.Generator().manual_seed(3))
    sampling = all_pairs_sampling()
    result = implementation(model, images, torch.zeros(2, dtype=torch.long), sampling)

    z_bn = F.avg_pool2d(images.mean(dim=1, keepdim=True), SIZE // GRID).flatten(1).double()
    expected_b = a * z_bn[:, p] * z_bn[:, q]
    for b in range(2):
        column = pair_column(result.pairs_bp2[b], p, q)
        interaction_op = result.pair_interaction_bop[b]
        torch.testing.assert_close(
            interaction_op[:, column], expected_b[b].expand(13), rtol=1e-5, atol=1e-6
        )
        others_op = torch.cat([interaction_op[:, :column], interaction_op[:, column + 1 :]], 1)
        assert others_op.abs().max() < 1e-5
    torch.testing.assert_close(
        result.strength_o,
        expected_b.abs().mean().expand(13) / sampling.n_pairs,
        rtol=1e-5,
        atol=1e-7,
    )
    torch.testing.assert_close(
        result.relative_strength_o, torch.ones(13, dtype=torch.float64), rtol=1e-4, atol=0
    )


def test_three_way_term_weighs_pairs_by_context_membership():
    p, q, r, a = 5, 6, 9, 2.0  # mutual neighbours
    model = PlayerScoreModel(lambda z_bn: a * z_bn[:, p] * z_bn[:, q] * z_bn[:, r])
    images = blocky_images(1, torch.Generator().manual_seed(4))
    sampling = all_pairs_sampling(n_contexts=6, order_ratios=(0.0, 0.3, 0.6, 1.0))
    result = interaction_strength(model, images, torch.zeros(1, dtype=torch.long), sampling)
    plan = sample_plan(sampling, 0)
    present_ocpqn = ~plan.masked_ocpqn
    z_n = F.avg_pool2d(images.mean(dim=1, keepdim=True), SIZE // GRID).flatten().double()
    for i, j, third in [(p, q, r), (p, r, q), (q, r, p)]:
        column = pair_column(plan.pairs_p2, i, j)
        in_context_oc = present_ocpqn[:, :, column, 0, third].double()
        expected_o = a * z_n[p] * z_n[q] * z_n[r] * in_context_oc.mean(dim=1)
        torch.testing.assert_close(
            result.pair_interaction_bop[0, :, column], expected_o, rtol=1e-5, atol=1e-6
        )
    # Order 0 never contains the third player, order n - 2 always does.
    assert result.pair_interaction_bop[0, 0].abs().max() < 1e-6
    column = pair_column(plan.pairs_p2, p, q)
    torch.testing.assert_close(
        result.pair_interaction_bop[0, -1, column],
        a * z_n[p] * z_n[q] * z_n[r],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("shared_contexts", [True, False])
def test_plan_contexts_have_the_order_size_and_exclude_the_pair(shared_contexts):
    sampling = InteractionSampling(
        grid=5, n_pairs=12, n_contexts=4, seed=3, shared_contexts=shared_contexts
    )
    plan = sample_plan(sampling, image_index=2)
    present_ocpqn = ~plan.masked_ocpqn
    n = sampling.n_players
    assert sampling.orders == (0, 1, 2, 4, 6, 9, 11, 13, 16, 18, 20, 21, 23)
    distance = (
        (plan.pairs_p2[:, 0] // 5 - plan.pairs_p2[:, 1] // 5)
        .abs()
        .maximum((plan.pairs_p2[:, 0] % 5 - plan.pairs_p2[:, 1] % 5).abs())
    )
    assert ((distance >= 1) & (distance <= 2)).all()
    assert len({tuple(pair) for pair in plan.pairs_p2.tolist()}) == 12

    context_ocpn = present_ocpqn[:, :, :, 0]
    sizes = torch.tensor(sampling.orders)[:, None, None].expand(context_ocpn.shape[:3])
    assert torch.equal(context_ocpn.sum(-1), sizes)
    one_hot_i_pn = F.one_hot(plan.pairs_p2[:, 0], n).bool()
    one_hot_j_pn = F.one_hot(plan.pairs_p2[:, 1], n).bool()
    assert not (context_ocpn & (one_hot_i_pn | one_hot_j_pn)).any()
    assert torch.equal(present_ocpqn[..., 1, :], context_ocpn | one_hot_i_pn)
    assert torch.equal(present_ocpqn[..., 2, :], context_ocpn | one_hot_j_pn)
    assert torch.equal(present_ocpqn[..., 3, :], context_ocpn | one_hot_i_pn | one_hot_j_pn)
    assert torch.equal(present_ocpqn[-1, :, :, 3], torch.ones_like(context_ocpn[-1]))
    # Same seed and image -> same plan; another image -> another plan.
    again = sample_plan(sampling, image_index=2)
    assert torch.equal(again.masked_ocpqn, plan.masked_ocpqn)
    assert not torch.equal(sample_plan(sampling, 3).masked_ocpqn, plan.masked_ocpqn)


def test_shared_contexts_coincide_across_pairs_but_independent_ones_do_not():
    def distinct_contexts(shared):
        sampling = InteractionSampling(grid=6, n_pairs=30, n_contexts=4, shared_contexts=shared)
        context_rn = (~sample_plan(sampling, 0).masked_ocpqn[5, :, :, 0]).reshape(-1, 36)
        return len(torch.unique(context_rn, dim=0))

    assert distinct_contexts(shared=True) < 0.7 * distinct_contexts(shared=False)


@pytest.mark.parametrize("shared_contexts", [True, False])
def test_every_pair_sees_uniform_contexts(shared_contexts):
    # 3 x 3 grid, order 1: each of the 7 other players should be the context 1/7 of the time.
    sampling = InteractionSampling(
        grid=3, order_ratios=(0.2,), n_pairs=3, n_contexts=7000, shared_contexts=shared_contexts
    )
    plan = sample_plan(sampling, 0)
    counts_pn = (~plan.masked_ocpqn[0, :, :, 0]).sum(dim=0)
    for pair, counts_n in zip(plan.pairs_p2.tolist(), counts_pn, strict=True):
        others = [k for k in range(9) if k not in pair]
        assert counts_n[pair].sum() == 0
        assert ((counts_n[others] - 1000).abs() < 130).all(), counts_n  # 4 binomial sigmas


def tiny_cnn(n_classes=5):
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_fast_matches_reference_on_a_tiny_cnn():
    model = tiny_cnn()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 3])
    sampling = InteractionSampling(grid=GRID, n_pairs=20, n_contexts=3, seed=11)
    reference = interaction_strength_reference_batched(model, images, labels, sampling)
    fast = interaction_strength(model, images, labels, sampling)

    assert torch.equal(fast.pairs_bp2, reference.pairs_bp2)
    assert fast.n_forwards < 0.7 * reference.n_forwards
    rtol, atol = FAST_VS_REFERENCE_TOLERANCE
    bound = rtol * float(reference.strength_o.max()) + atol
    assert (fast.strength_o - reference.strength_o).abs().max() <= bound
    assert (fast.pair_interaction_bop - reference.pair_interaction_bop).abs().max() <= bound
    assert reference.strength_o.min() > 100 * bound  # the comparison is not vacuous
    # Without folding / channels-last the fast path sees the very same fp32 model.
    plain = interaction_strength(model, images, labels, sampling, fold_batchnorm=False)
    assert (plain.strength_o - reference.strength_o).abs().max() <= bound
    assert model.training is False


def test_fast_warns_and_falls_back_when_batchnorm_cannot_be_folded():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats torch.fx
                return self.net(x)
            return self.net(-x)

    model = Untraceable().eval()
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    sampling = InteractionSampling(grid=GRID, n_pairs=4, n_contexts=2)
    with pytest.warns(UserWarning, match="could not fold batch-norm"):
        fast = interaction_strength(model, images, torch.tensor([0]), sampling)
    reference = interaction_strength_reference_batched(model, images, torch.tensor([0]), sampling)
    rtol, atol = FAST_VS_REFERENCE_TOLERANCE
    assert (fast.strength_o - reference.strength_o).abs().max() <= rtol * float(
        reference.strength_o.max()
    ) + atol


class CrashAfter(nn.Module):
    """Counts forwards of ``inner`` and raises once ``limit`` is reached (a pre-empted job)."""

    def __init__(self, inner, limit=math.inf):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, 0

    def forward(self, x):
        if self.calls >= self.limit:
            raise RuntimeError("job pre-empted")
        self.calls += 1
        return self.inner(x)


def test_resumed_run_skips_finished_images_and_matches_an_uninterrupted_run(tmp_path):
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 2, 4])
    sampling = InteractionSampling(grid=GRID, n_pairs=6, n_contexts=2)
    calls_per_image = math.ceil(13 * 2 * 6 * 4 / 64)
    state = tmp_path / "nested" / "interactions.json"

    crashing = CrashAfter(tiny_cnn(), limit=calls_per_image + 1)  # dies inside image 1
    with pytest.raises(RuntimeError, match="pre-empted"):
        interaction_strength_reference_batched(crashing, images, labels, sampling, state_path=state)
    assert set(json.loads(state.read_text())["done"]) == {"0"}
    assert not list(state.parent.glob(".*"))  # no temp files left behind

    counting = CrashAfter(tiny_cnn())
    resumed = interaction_strength_reference_batched(
        counting, images, labels, sampling, state_path=state
    )
    assert counting.calls == 2 * calls_per_image
    assert resumed.n_forwards == 2 * 13 * 2 * 6 * 4
    fresh = interaction_strength_reference_batched(tiny_cnn(), images, labels, sampling)
    assert torch.equal(resumed.pair_interaction_bop, fresh.pair_interaction_bop)
    assert torch.equal(resumed.pairs_bp2, fresh.pairs_bp2)

    # A finished state file answers without any forward pass.
    again = interaction_strength_reference_batched(
        CrashAfter(tiny_cnn(), limit=0), images, labels, sampling, state_path=state
    )
    assert again.n_forwards == 0
    assert torch.equal(again.pair_interaction_bop, fresh.pair_interaction_bop)


def test_state_file_of_another_run_is_refused(tmp_path):
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([1])
    state = tmp_path / "state.json"
    sampling = InteractionSampling(grid=GRID, n_pairs=3, n_contexts=1)
    interaction_strength(tiny_cnn(), images, labels, sampling, state_path=state)
    other = InteractionSampling(grid=GRID, n_pairs=3, n_contexts=1, seed=1)
    with pytest.raises(ValueError, match=r"state\.json.*different sampling"):
        interaction_strength(tiny_cnn(), images, labels, other, state_path=state)
    with pytest.raises(ValueError, match="different implementation"):
        interaction_strength_reference_batched(
            tiny_cnn(), images, labels, sampling, state_path=state
        )
    with pytest.raises(ValueError, match="different images"):
        interaction_strength(tiny_cnn(), images + 1, labels, sampling, state_path=state)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="choose n_pairs in"):
        InteractionSampling(grid=3, n_pairs=100)
    with pytest.raises(ValueError, match="order_ratios"):
        InteractionSampling(order_ratios=(0.5, 1.5))
    sampling = InteractionSampling(grid=GRID, n_pairs=2, n_contexts=1)
    with pytest.raises(ValueError, match="not divisible by grid=4"):
        interaction_strength(tiny_cnn(), torch.zeros(1, 3, 18, 18), torch.tensor([0]), sampling)
    with pytest.raises(ValueError, match="labels must have shape"):
        interaction_strength(tiny_cnn(), torch.zeros(2, 3, 16, 16), torch.tensor([0]), sampling)
    with pytest.raises(ValueError, match="at least 2 classes"):
        log_odds(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def small_map_cnn(n_classes=5):
    """Strided convolutions down to 2x2 and 1x1 maps on 16 px inputs (3x3 kernels, padding 1)."""
    torch.manual_seed(9)
    layers = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for c_in, c_out in ((8, 16), (16, 32), (32, 32)):  # 8x8 -> 4x4 -> 2x2 -> 1x1
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten()]
    layers += [nn.Linear(32, n_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.weight.data.mul_(3.0)  # strong non-linearity: interactions well above 1e-6
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_small_convolutions_become_dense_matrices_with_the_same_output():
    from a2mim.analysis.interactions import _dense_small_convs, _DenseConv

    model = small_map_cnn()
    x_bchw = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    dense = _dense_small_convs(model, x_bchw[:1])
    replaced = [name for name, m in dense.named_modules() if isinstance(m, _DenseConv)]
    # 16->8, 8->4, 4->2 stay (as matrices: 131k, 33k, 33k multiply-adds > the convolutions'
    # 18k, 18k, 18k); 2->1 (4k < 9k) and 1->1 (1k < 9k) become matrices
    assert replaced == ["7", "9"]
    assert type(model[7]) is nn.Conv2d and type(model[9]) is nn.Conv2d  # model untouched
    with torch.no_grad():
        torch.testing.assert_close(dense(x_bchw), model(x_bchw), rtol=1e-5, atol=1e-6)


def test_fast_with_dense_convolutions_matches_reference():
    model = small_map_cnn()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 2])
    sampling = InteractionSampling(grid=GRID, n_pairs=20, n_contexts=3, seed=2)
    reference = interaction_strength_reference_batched(model, images, labels, sampling)
    fast = interaction_strength(model, images, labels, sampling)
    rtol, atol = FAST_VS_REFERENCE_TOLERANCE
    bound = rtol * float(reference.strength_o.max()) + atol
    assert (fast.pair_interaction_bop - reference.pair_interaction_bop).abs().max() <= bound
    assert reference.strength_o.min() > 100 * bound  # the comparison is not vacuous
