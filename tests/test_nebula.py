"""The NVC bottleneck against hand-computed values, and its anchor upkeep."""

import math

import pytest
import torch

from nvc_hf.nebula import (
    NVCBottleneck,
    anchor_masses,
    inverse_anchor_distance,
    kl_divergence,
    kmeans,
    nebula_loss,
    pairwise_anchor_distances,
    squared_distances,
    triplet_loss,
)


# Three means on a line and two anchors: the first two means belong to anchor 0, the third to anchor 1.
MEANS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
ANCHORS = torch.tensor([[0.0, 0.0], [3.0, 0.0]])


def distances_and_assignments():
    distances = squared_distances(MEANS, ANCHORS)
    return distances, distances.argmin(1)


def test_squared_distances_values():
    distances, assignments = distances_and_assignments()
    assert torch.allclose(distances, torch.tensor([[0.0, 9.0], [1.0, 4.0], [9.0, 0.0]]))
    assert assignments.tolist() == [0, 0, 1]


@pytest.mark.parametrize("reduction, expected", [("sum", [2.0, 1.0]), ("mean", [1.0 + 1.0 / 3.0, 1.0])])
def test_anchor_masses(reduction, expected):
    distances, assignments = distances_and_assignments()
    masses = anchor_masses(distances, assignments, num_anchors=2, reduction=reduction)
    assert torch.allclose(masses, torch.tensor(expected))


@pytest.mark.parametrize(
    "form, radius, expected",
    [
        ("softplus", 1.0, math.log(1 + 1 / 9)),
        ("softplus", 3.0, math.log(2.0)),
        ("clamp", 1.0, 0.0),
        ("clamp", 6.0, math.log(4.0)),
        ("raw", 1.0, -math.log(9.0)),
    ],
)
def test_inverse_anchor_distance_forms(form, radius, expected):
    value = inverse_anchor_distance(torch.tensor(9.0), form, radius, eps=0.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_clamp_form_is_zero_not_negative_far_apart():
    value = inverse_anchor_distance(torch.tensor(1e6), "clamp", 1.0, eps=1e-6)
    assert value.item() == 0.0


@pytest.mark.parametrize(
    "form, reduction, expected",
    [
        ("softplus", "sum", 2.0 * 1.0 * math.log(1 + 1 / 9)),
        ("softplus", "mean", (4.0 / 3.0) * math.log(1 + 1 / 9)),
        ("raw", "sum", 2.0 * -math.log(9.0)),
        ("clamp", "mean", 0.0),
    ],
)
def test_nebula_loss_values(form, reduction, expected):
    distances, assignments = distances_and_assignments()
    loss = nebula_loss(distances, assignments, ANCHORS, form=form, radius=1.0, eps=0.0, mass_reduction=reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kl_standard_prior_value():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    assert kl_divergence(mean, logvar).item() == pytest.approx(1.0 - 0.5 * math.log(2.0), rel=1e-6)


def test_kl_anchor_prior_value():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    prior = torch.tensor([[1.0, 0.0]])
    assert kl_divergence(mean, logvar, prior).item() == pytest.approx(0.5 * (1.0 - math.log(2.0)), rel=1e-6)


def test_triplet_single_cluster_is_zero():
    latents = torch.randn(8, 4, requires_grad=True)
    loss = triplet_loss(latents, torch.zeros(8, dtype=torch.long), margin=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(latents.grad).all()


def test_triplet_hardest_pairs_value():
    latents = torch.tensor([[0.0], [3.0], [4.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Per sample: max(0, 9 - 16 + 1), max(0, 9 - 1 + 1), max(0, 36 - 1 + 1), max(0, 36 - 49 + 1).
    assert triplet_loss(latents, labels, margin=1.0).item() == pytest.approx((0 + 9 + 36 + 0) / 4)


def test_triplet_gradient_matches_plain_formula():
    """The loss picks its hardest pairs without autograd. Values and gradients must equal the plain formula."""
    torch.manual_seed(0)
    latents = torch.randn(40, 5, requires_grad=True)
    labels = torch.randint(0, 4, (40,))
    triplet_loss(latents, labels, margin=1.0).backward()

    reference_latents = latents.detach().clone().requires_grad_(True)
    distances = (reference_latents.unsqueeze(1) - reference_latents.unsqueeze(0)).pow(2).sum(-1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positives = same & ~torch.eye(40, dtype=torch.bool)
    hardest_positive = distances.masked_fill(~positives, float("-inf")).amax(1)
    hardest_negative = distances.masked_fill(same, float("inf")).amin(1)
    reference = torch.relu(hardest_positive - hardest_negative + 1.0).mean()
    reference.backward()

    assert triplet_loss(latents, labels, margin=1.0).item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(latents.grad, reference_latents.grad, atol=1e-5)


def test_pairwise_anchor_distances_match_differences():
    torch.manual_seed(0)
    anchors = torch.randn(12, 6)
    expected = (anchors.unsqueeze(1) - anchors.unsqueeze(0)).pow(2).sum(-1)
    distances = pairwise_anchor_distances(anchors)
    assert torch.allclose(distances, expected, atol=1e-5)
    assert (distances.diagonal() == 0).all()


def test_no_mask_equals_a_mask_of_ones():
    torch.manual_seed(0)
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4)
    bottleneck.anchors_initialized.fill_(True)
    features = torch.randn(2, 5, 6)

    torch.manual_seed(1)
    unmasked = bottleneck(features)
    torch.manual_seed(1)
    masked = bottleneck(features, attention_mask=torch.ones(2, 5, dtype=torch.long))

    for name in ("latents", "assignments", "kl_loss", "nebula_loss", "metric_loss", "loss"):
        assert torch.equal(getattr(unmasked, name), getattr(masked, name)), name


def test_coincident_anchors_give_finite_loss_and_gradients():
    bottleneck = NVCBottleneck(input_size=8, latent_size=4, num_anchors=3)
    with torch.no_grad():
        bottleneck.anchors.zero_()
        bottleneck.anchors_initialized.fill_(True)
    output = bottleneck(torch.randn(16, 8))
    output.loss.backward()
    assert torch.isfinite(output.nebula_loss)
    assert torch.isfinite(output.loss)
    assert torch.isfinite(bottleneck.anchors.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in bottleneck.parameters() if p.grad is not None)


def test_padding_takes_no_part():
    torch.manual_seed(0)
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4).eval()
    bottleneck.anchors_initialized.fill_(True)
    features = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    padded = bottleneck(features, attention_mask=mask)
    changed = features.clone()
    changed[0, 3:] = 100.0
    changed_output = bottleneck(changed, attention_mask=mask)

    assert padded.assignments[0, 3:].tolist() == [-1, -1]
    assert (padded.assignments[mask.bool()] >= 0).all()
    for name in ("kl_loss", "nebula_loss", "metric_loss", "loss"):
        assert torch.allclose(getattr(padded, name), getattr(changed_output, name)), name


def test_output_shapes_for_sequences():
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4)
    output = bottleneck(torch.randn(2, 5, 6))
    assert output.latents.shape == (2, 5, 3)
    assert output.logvar.shape == (2, 5, 3)
    assert output.assignments.shape == (2, 5)
    assert output.anchor_distances.shape == (2, 5, 4)


def test_eval_mode_latents_equal_mean():
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4).eval()
    output = bottleneck(torch.randn(7, 6))
    assert torch.equal(output.latents, output.mean)


def test_deterministic_bottleneck_has_no_anchors():
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, bottleneck_type="none")
    names = [name for name, _ in bottleneck.named_parameters()]
    assert names == ["mean_projection.weight", "mean_projection.bias"]
    output = bottleneck(torch.randn(4, 6))
    assert output.assignments is None
    assert output.loss.item() == 0.0
    assert torch.equal(output.latents, output.mean)


def test_wrong_feature_rank_error():
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4)
    with pytest.raises(ValueError, match=r"\(batch, input_size\) or \(batch, length, input_size\)"):
        bottleneck(torch.randn(6))


def test_mask_shape_mismatch_error():
    bottleneck = NVCBottleneck(input_size=6, latent_size=3, num_anchors=4)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        bottleneck(torch.randn(2, 5, 6), attention_mask=torch.ones(2, 4))


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centre + 0.1 * torch.randn(50, 2, generator=generator) for centre in centres])
    found = kmeans(points, 3, iterations=10, generator=generator)
    nearest = squared_distances(centres, found).min(1).values
    assert (nearest < 0.05).all()


def test_warmup_then_kmeans_initialisation():
    torch.manual_seed(0)
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=3, anchor_warmup_steps=2)
    optimizer = torch.optim.Adam(bottleneck.parameters(), lr=1e-3)
    features = torch.cat([torch.randn(20, 4) + 8 * offset for offset in (0, 1, 2)])

    first = bottleneck(features)
    assert first.nebula_loss.item() == 0.0
    first.loss.backward()
    optimizer.step()
    bottleneck.update_anchors(optimizer)
    assert not bottleneck.nvc_active

    bottleneck(features).loss.backward()
    optimizer.step()
    statistics = bottleneck.update_anchors(optimizer)
    assert bottleneck.nvc_active
    assert statistics["anchors_initialized"] == 1.0
    assert bottleneck.radius.item() > 0
    # Every anchor sits on data after k-means, so each one receives latents.
    assignments = bottleneck.eval()(features).assignments
    assert torch.bincount(assignments, minlength=3).min() > 0


def test_dead_anchor_is_reseeded_onto_a_latent():
    torch.manual_seed(0)
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=3)
    optimizer = torch.optim.Adam(bottleneck.parameters(), lr=1e-3)
    for _ in range(2):  # initialisation, then the first usage update
        bottleneck(torch.randn(32, 4)).loss.backward()
        optimizer.step()
        bottleneck.update_anchors(optimizer)
    assert bottleneck.nvc_active
    assert bottleneck.num_reseeded.item() == 0

    with torch.no_grad():
        bottleneck.anchors[2] = 1000.0
    bottleneck.anchor_usage[2] = 0.0
    features = torch.randn(32, 4)
    output = bottleneck(features)
    output.loss.backward()
    optimizer.step()
    bottleneck.update_anchors(optimizer)

    assert bottleneck.num_reseeded.item() == 1
    moved_to = bottleneck.anchors[2].detach()
    assert squared_distances(moved_to[None], output.mean.detach()).min().item() < 1e-3
    assert (optimizer.state[bottleneck.anchors]["exp_avg"][2] == 0).all()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_anchors": 1}, "num_anchors must be an integer >= 2, got 1"),
        ({"latent_size": 0}, "latent_size must be an integer >= 1, got 0"),
        ({"kl_prior": "laplace"}, "kl_prior='laplace' is not supported"),
        ({"bottleneck_type": "vq"}, "bottleneck_type='vq' is not supported"),
        ({"nebula_radius": -1.0}, "nebula_radius"),
    ],
)
def test_bottleneck_rejects_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        NVCBottleneck(input_size=4, **arguments)


def test_initialisation_waits_for_one_latent_per_anchor():
    torch.manual_seed(0)
    bottleneck = NVCBottleneck(input_size=4, latent_size=2, num_anchors=20, anchor_warmup_steps=0)
    optimizer = torch.optim.Adam(bottleneck.parameters(), lr=1e-3)
    for step in range(3):
        bottleneck(torch.randn(8, 4)).loss.backward()
        optimizer.step()
        bottleneck.update_anchors(optimizer)
        assert bottleneck.nvc_active == (step == 2), step
