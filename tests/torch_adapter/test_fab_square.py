"""FAB(-T) and Square: threat-model constraints, torchattacks agreement, seeds, conventions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from gdws_torch.robustness.fab import FAB, boundary_projection
from gdws_torch.robustness.square import Square, p_selection

EPS = {"Linf": 0.1, "L2": 0.6}
P = {"Linf": float("inf"), "L2": 2.0}


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.long)
    x, y = images[:1200], labels[:1200]
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        i = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), (images[1200:1500], labels[1200:1500])


def correct(model, images, labels):
    with torch.no_grad():
        return model(images).argmax(1) == labels


def assert_in_threat_model(adversarial, images, norm, eps):
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    delta = (adversarial - images).flatten(1)
    assert float(delta.norm(p=P[norm], dim=1).max()) <= eps * (1 + 1e-5)


# -- the projection ------------------------------------------------------------------------


def bisect(function, low, high, iterations=200):
    """The root of a non-increasing ``function`` in ``[low, high]``, per row, by bisection
    (``function(low) >= 0 >= function(high)``): to the last bit of float64 after 200
    halvings, whatever the machine (no tolerance, no iteration limit to hit)."""
    for _ in range(iterations):
        middle = (low + high) / 2
        above = function(middle) > 0
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return (low + high) / 2


def exact_boundary_projection(t, w, b, norm):
    """The smallest step ``d`` with ``w . (t + d) = b`` and ``0 <= t + d <= 1``, per row
    (rows whose box reaches the hyperplane), in float64 NumPy.

    L2: the KKT conditions give ``d = clip(-mu w, -t, 1 - t)`` for the multiplier ``mu``
    of the hyperplane, where ``g(mu) = w . (t + d(mu)) - b`` is continuous, piecewise linear
    and non-increasing: ``mu`` is its root. Linf: moving each coordinate by at most
    ``lam`` towards the hyperplane closes at most ``r(lam) = sum |w_i| min(lam, room_i)`` of
    the gap ``|w . t - b|`` (``room_i``: the distance to the bound in that direction); the
    least ``lam`` closing it is the norm, and the step moves every coordinate with
    ``w_i != 0`` by ``min(lam, room_i)`` (any smaller move leaves a gap).
    """
    t, w, b = (np.asarray(a, dtype=np.float64) for a in (t, w, b))
    gap = (w * t).sum(1) - b
    if norm == "L2":
        magnitude = np.where(w != 0, np.abs(w), np.inf)
        reach = (1 / magnitude).max(1)  # beyond +-reach every coordinate sits at a bound

        def residual(mu):
            return (w * (t + np.clip(-mu[:, None] * w, -t, 1 - t))).sum(1) - b

        mu = bisect(residual, -reach, reach)
        return np.clip(-mu[:, None] * w, -t, 1 - t)
    direction = -np.sign(gap[:, None] * w)  # the sign of each coordinate's move
    room = np.where(direction > 0, 1 - t, t)

    def left(lam):  # the gap left after moves of at most lam: non-increasing in lam
        return np.abs(gap) - (np.abs(w) * np.minimum(lam[:, None], room)).sum(1)

    lam = bisect(left, np.zeros(len(t)), np.ones(len(t)))
    return direction * np.minimum(lam[:, None], room)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_boundary_projection_is_the_smallest_feasible_step(norm):
    generator = torch.Generator().manual_seed(0)
    m, d = 300, 6
    t = torch.rand(m, d, generator=generator, dtype=torch.float64)
    t[:, :2] = t[:, :2].round()  # coordinates on the box's faces
    w = torch.randn(m, d, generator=generator, dtype=torch.float64)
    w[::7, -1] = 0  # a coordinate the hyperplane ignores
    scale = torch.logspace(-3, 1, m, dtype=torch.float64)
    b = (w * t).sum(1) + torch.randn(m, generator=generator, dtype=torch.float64) * scale
    step = boundary_projection(t, w, b, norm)
    moved = t + step
    assert float(moved.min()) >= -1e-12 and float(moved.max()) <= 1 + 1e-12
    # Reachable: the box corner that goes furthest towards the hyperplane.
    c = (w * t).sum(1) - b
    corner = torch.where((w > 0) == (c[:, None] > 0), 0.0, 1.0).to(t.dtype)
    reachable = ((w * corner).sum(1) - b) * c <= 0
    assert 50 < int(reachable.sum()) < m  # both kinds of rows
    miss = ((w * moved).sum(1) - b).abs()
    assert float(miss[reachable].max()) < 1e-9
    assert torch.allclose(moved[~reachable], torch.where(w == 0, t, corner)[~reachable])
    # Optimal: the exact solution (unique on the coordinates the hyperplane sees).
    tr, wr, br = t[reachable].numpy(), w[reachable].numpy(), b[reachable].numpy()
    exact = exact_boundary_projection(tr, wr, br, norm)
    inside = (tr + exact >= 0) & (tr + exact <= 1)
    assert inside.all() and np.abs((wr * (tr + exact)).sum(1) - br).max() < 1e-9
    np.testing.assert_allclose(step[reachable].numpy(), exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_boundary_projection_matches_the_reference_code(norm):
    fab_module = pytest.importorskip("torchattacks.attacks.fab")
    reference = {"Linf": fab_module.projection_linf, "L2": fab_module.projection_l2}[norm]
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(400, 64, generator=generator, dtype=torch.float64)
    w = torch.randn(400, 64, generator=generator, dtype=torch.float64)
    b = (w * t).sum(1) + torch.randn(400, generator=generator, dtype=torch.float64)
    assert torch.allclose(boundary_projection(t, w, b, norm), reference(t, w, b), atol=1e-10)


# -- FAB -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fab_stays_in_the_ball_and_the_box_and_attacks(trained, norm):
    model, (x, y) = trained
    adversarial = FAB(model, norm=norm, eps=EPS[norm], steps=10, n_target_classes=3)(x, y)
    assert_in_threat_model(adversarial, x, norm, EPS[norm])
    clean, robust = correct(model, x, y), correct(model, adversarial, y)
    assert float(robust.float().mean()) < float(clean.float().mean()) - 0.2
    unchanged = (adversarial == x).flatten(1).all(1)
    assert bool((unchanged | ~robust).all())  # a changed sample is misclassified
    assert bool(unchanged[~clean].all())  # misclassified samples are left alone


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fab_t_agrees_with_torchattacks(trained, norm):
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = trained
    eps = EPS[norm]
    ours = FAB(model, norm=norm, eps=eps, steps=20, final_search_steps=0)(x, y)
    reference = torchattacks.FAB(
        model, norm=norm, eps=eps, steps=20, multi_targeted=True, n_classes=10
    )(x, y)
    ours_ok, reference_ok = correct(model, ours, y), correct(model, reference, y)
    assert 0.2 < float(reference_ok.float().mean()) < 0.8  # a meaningful operating point
    # The same deterministic algorithm: the same samples broken, nearly the same images.
    assert int((ours_ok != reference_ok).sum()) <= 3
    same = ((ours - reference).abs().flatten(1).amax(1) < 1e-2).float().mean()
    assert float(same) >= 0.97
    # The final search only shrinks perturbations: at most as many survivors.
    searched = FAB(model, norm=norm, eps=eps, steps=20)(x, y)
    assert int(correct(model, searched, y).sum()) <= int(ours_ok.sum())


def test_untargeted_fab_agrees_with_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = trained
    x, y = x[:150], y[:150]
    ours = FAB(model, eps=0.1, steps=15, targeted=False, final_search_steps=0)(x, y)
    reference = torchattacks.FAB(model, norm="Linf", eps=0.1, steps=15)(x, y)
    assert int((correct(model, ours, y) != correct(model, reference, y)).sum()) <= 2
    assert float(correct(model, ours, y).float().mean()) < 0.8


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_final_search_shrinks_and_stays_misclassified(trained, norm):
    model, (x, y) = trained
    x, y = x[:120], y[:120]
    # eps = the pixel box's diameter (8x8 digits): every perturbation found is kept.
    kwargs = {"norm": norm, "eps": {"Linf": 1.0, "L2": 8.0}[norm], "steps": 10}
    kwargs["n_target_classes"] = 2
    plain = FAB(model, final_search_steps=0, **kwargs)(x, y)
    searched = FAB(model, final_search_steps=3, **kwargs)(x, y)
    plain_size = (plain - x).flatten(1).norm(p=P[norm], dim=1)
    searched_size = (searched - x).flatten(1).norm(p=P[norm], dim=1)
    found = correct(model, x, y) & ~correct(model, plain, y)
    assert int(found.sum()) > 50
    assert bool((~correct(model, searched, y))[found].all())
    assert bool((searched_size[found] <= plain_size[found] * (1 + 1e-5)).all())
    # FAB ends close to the boundary already: the search gains a little, on most samples.
    shrunk = searched_size[found] < plain_size[found] * (1 - 1e-4)
    assert float(shrunk.float().mean()) > 0.5


# -- Square --------------------------------------------------------------------------------


def test_p_schedule_matches_the_reference_code():
    torchattacks = pytest.importorskip("torchattacks")
    for n_queries in (300, 5000, 10000):
        reference = torchattacks.Square(nn.Linear(1, 1), n_queries=n_queries, p_init=0.8)
        for it in range(n_queries):
            assert p_selection(0.8, it, n_queries) == reference.p_selection(it), (n_queries, it)
    assert p_selection(0.8, 10, 10000) == 0.8 and p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 8001, 10000) == 0.8 / 512


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_stays_in_the_ball_and_the_box_and_attacks(trained, norm):
    model, (x, y) = trained
    adversarial = Square(model, norm=norm, eps=EPS[norm], n_queries=200)(x, y)
    assert_in_threat_model(adversarial, x, norm, EPS[norm])
    clean, robust = correct(model, x, y), correct(model, adversarial, y)
    assert float(robust.float().mean()) < float(clean.float().mean()) - 0.2
    unchanged = (adversarial == x).flatten(1).all(1)
    assert bool((unchanged | ~robust).all())
    assert bool(unchanged[~clean].all())


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_agrees_with_torchattacks(trained, norm):
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = trained
    eps = EPS[norm]
    ours = Square(model, norm=norm, eps=eps, n_queries=600)(x, y)
    per_sample = Square(model, norm=norm, eps=eps, n_queries=600)(
        x, y, sample_ids=torch.arange(len(x))
    )
    reference = torchattacks.Square(model, norm=norm, eps=eps, n_queries=600)(x, y)
    reference_ok = correct(model, reference, y)
    assert 0.3 < float(reference_ok.float().mean()) < 0.85  # a meaningful operating point
    for adversarial in (ours, per_sample):
        ok = correct(model, adversarial, y)
        # Random search with other random numbers: robust accuracy within 5 points (two
        # torchattacks seeds differ by up to 3), and the same samples broken, but for a few
        # near the edge.
        assert abs(float(ok.float().mean()) - float(reference_ok.float().mean())) <= 0.05
        assert float((ok == reference_ok).float().mean()) >= 0.9


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the Square attack must not differentiate the model")


class Recording(nn.Module):
    """Logs every query: its batch size and whether autograd was recording."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.grad_enabled.append(torch.is_grad_enabled())
        return _NoBackward.apply(self.model(x))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_only_queries_outputs_and_stops_broken_samples(trained, norm):
    model, (x, y) = trained
    x, y = x[:64], y[:64]
    recording = Recording(model)
    with torch.enable_grad():
        adversarial = Square(recording, norm=norm, eps=EPS[norm], n_queries=100)(x, y)
    assert not any(recording.grad_enabled)
    sizes = recording.sizes
    assert len(sizes) <= 100 + 1  # the clean check, then at most n_queries per sample
    assert sizes[0] == 64 and sizes[1] == int(correct(model, x, y).sum())
    assert all(a >= b for a, b in itertools.pairwise(sizes[1:]))  # only fewer
    assert sizes[-1] < sizes[1]  # broken samples stopped being queried
    assert sizes[-1] >= int(correct(model, adversarial, y).sum())


# -- seeds, batching, conventions ----------------------------------------------------------


def test_seeded_attacks_are_deterministic(trained):
    model, (x, y) = trained
    x, y = x[:100], y[:100]
    for norm in ("Linf", "L2"):
        first = Square(model, norm=norm, eps=EPS[norm], n_queries=100, seed=5)(x, y)
        again = Square(model, norm=norm, eps=EPS[norm], n_queries=100, seed=5)(x, y)
        other = Square(model, norm=norm, eps=EPS[norm], n_queries=100, seed=6)(x, y)
        assert torch.equal(first, again) and not torch.equal(first, other)
    fab = {"eps": 0.08, "steps": 5, "n_restarts": 2, "n_target_classes": 2}
    first = FAB(model, seed=5, **fab)(x, y)
    assert torch.equal(first, FAB(model, seed=5, **fab)(x, y))


BATCHING = {
    "square-linf": (Square, {"norm": "Linf", "eps": 0.1, "n_queries": 150}),
    "square-l2": (Square, {"norm": "L2", "eps": 0.6, "n_queries": 150}),
    # Restarts (the only randomness of FAB) matter where one step from the clean image
    # falls short and a random start at eps / 2 does not.
    "fab-l2": (FAB, {"norm": "L2", "eps": 1.0, "steps": 1, "n_restarts": 6, "n_target_classes": 1}),
}


@pytest.mark.parametrize(("cls", "kwargs"), BATCHING.values(), ids=BATCHING.keys())
def test_sample_ids_make_results_independent_of_batching(trained, cls, kwargs):
    model, (x, y) = trained
    x, y = x[:150], y[:150]
    ids = torch.arange(1000, 1150)
    order = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    attack = cls(model, seed=3, **kwargs)
    whole = attack(x, y, sample_ids=ids)
    pieces = torch.empty_like(whole)
    for chunk in order.split(40):
        pieces[chunk] = attack(x[chunk], y[chunk], sample_ids=ids[chunk])

    def same(a, b):
        return float(((a - b).abs().flatten(1).amax(1) <= 1e-5).float().mean())

    assert same(whole, pieces) >= 0.99  # a float-rounding flip at most
    assert same(whole, attack(x, y, sample_ids=ids + 1)) < 0.97  # the ids do seed


def test_linf_square_redraws_a_proposal_that_changes_nothing():
    attack = Square(nn.Identity(), eps=0.1)
    generator = torch.Generator().manual_seed(0)
    n = 14000
    x = 0.2 + 0.6 * torch.rand(n, 3, 8, 8, generator=generator)
    x_best = x + 0.1  # every channel already at +eps: the all-plus proposal is null
    numbers = torch.rand(n, 9, generator=generator, dtype=torch.float64)
    candidate = attack._linf_proposal(x, x_best, 7, numbers)  # the window covers [0, 7)^2
    plus = (candidate[:, :, 0, 0] > x[:, :, 0, 0]).long()
    assert bool((plus.sum(1) < 3).all())  # never the null proposal
    # The drawn signs where they change something, else a uniform redraw: each of the
    # seven other sign vectors with probability 1/7.
    codes = plus[:, 0] * 4 + plus[:, 1] * 2 + plus[:, 2]
    frequencies = torch.bincount(codes, minlength=8)[:7].double() / n
    assert torch.allclose(frequencies, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.015)
    drawn = numbers[:, 2:5] < 0.5
    kept = drawn.sum(1) < 3
    assert torch.equal(plus[kept].bool(), drawn[kept])
    # One channel: the only other sign.
    one = attack._linf_proposal(x[:50, :1], x_best[:50, :1], 7, numbers[:50, :5])
    assert torch.allclose(one[:, :, :7, :7], (x[:50, :1] - 0.1)[:, :, :7, :7])


def test_attacks_restore_modes_and_leave_parameters_alone(trained):
    model, (x, y) = trained
    model.zero_grad(set_to_none=True)  # torchattacks' FAB leaves gradients behind
    model.train()  # batch norm would use and update batch statistics
    model.head.eval()  # a frozen submodule keeps its own mode
    marker = torch.full_like(model.head.weight, 0.5)
    model.head.weight.grad = marker.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        FAB(model, eps=0.1, steps=3, n_target_classes=2)(x[:32], y[:32])
        FAB(model, eps=0.1, steps=2, targeted=False)(x[:16], y[:16])
        Square(model, norm="L2", eps=0.5, n_queries=20)(x[:32], y[:32])
        assert model.training and model.features[1].training and not model.head.training
        assert torch.equal(model.head.weight.grad, marker)
        assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        model.head.weight.grad = None
        model.eval()


def test_reprs(trained):
    model, _ = trained
    assert repr(FAB(model, norm="L2", eps=0.5, steps=7)) == (
        "FAB(norm='L2', eps=0.5, steps=7, n_restarts=1, targeted=True, n_target_classes=9, "
        "alpha_max=0.1, eta=1.05, beta=0.9, final_search_steps=3, seed=0)"
    )
    assert repr(Square(model, eps=0.25, n_queries=10)) == (
        "Square(norm='Linf', eps=0.25, n_queries=10, n_restarts=1, p_init=0.8, "
        "loss='margin', seed=0)"
    )


def test_bad_input(trained):
    model, (x, y) = trained
    for cls in (FAB, Square):
        with pytest.raises(ValueError, match=r"eps must be a finite real number > 0"):
            cls(model, eps=0)
        with pytest.raises(ValueError, match=r"eps must be .* got -0\.1"):
            cls(model, eps=-0.1)
        with pytest.raises(ValueError, match=r"norm must be 'Linf' or 'L2'; got 'L1'"):
            cls(model, norm="L1")
        with pytest.raises(TypeError, match=r"norm must be .* \(int\)"):
            cls(model, norm=2)
        with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
            cls("model")
        with pytest.raises(ValueError, match="n_restarts must be an integer >= 1; got 0"):
            cls(model, n_restarts=0)
        with pytest.raises(ValueError, match="seed must be an integer >= 0; got -1"):
            cls(model, seed=-1)
        attack = cls(model, eps=0.1, **({"steps": 1} if cls is FAB else {"n_queries": 2}))
        with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
            attack(x[:4] * 2 - 0.5, y[:4])
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
            attack(x[:4], torch.tensor([0, 1, 2, 10]))
        with pytest.raises(ValueError, match="labels must be class indices >= 0; got -1"):
            attack(x[:4], torch.tensor([0, 1, 2, -1]))
        with pytest.raises(TypeError, match="labels"):
            attack(x[:4], y[:4].float())
        with pytest.raises(ValueError, match="shape"):
            attack(x[:4], y[:3])
        with pytest.raises(ValueError, match="sample_ids must be 4 integer"):
            attack(x[:4], y[:4], sample_ids=[0, 1])
        with pytest.raises(TypeError, match=r"seed must be an integer >= 0; got None"):
            cls(model, seed=None)
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got 0"):
        FAB(model, steps=0)
    with pytest.raises(TypeError, match=r"targeted must be a bool; got 1 \(int\)"):
        FAB(model, targeted=1)
    with pytest.raises(ValueError, match="n_target_classes must be an integer >= 1; got 0"):
        FAB(model, n_target_classes=0)
    with pytest.raises(ValueError, match=r"beta must be .* \(0, 1\); got 1"):
        FAB(model, beta=1)
    with pytest.raises(ValueError, match=r"alpha_max must be .* <= 1; got 1\.5"):
        FAB(model, alpha_max=1.5)
    with pytest.raises(ValueError, match=r"eta must be .* >= 1; got 0\.5"):
        FAB(model, eta=0.5)
    with pytest.raises(ValueError, match=r"n_target_classes must be at most .* \(9: .*got 10"):
        FAB(model, n_target_classes=10, steps=1)(x[:4], y[:4])
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1; got 0"):
        Square(model, n_queries=0)
    with pytest.raises(ValueError, match=r"p_init must be .* <= 1; got 1\.5"):
        Square(model, p_init=1.5)
    with pytest.raises(ValueError, match=r"loss must be one of \('margin', 'ce'\); got 'l2'"):
        Square(model, loss="l2")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Square(model, n_queries=2)(x[:4].flatten(1), y[:4])
    with pytest.raises(ValueError, match="at least 5x5 pixels"):
        Square(model, norm="L2", n_queries=2)(x[:4, :, :4, :4], y[:4])
    # Empty batches pass through.
    assert FAB(model)(x[:0], y[:0]).shape == x[:0].shape
    assert Square(model)(x[:0], y[:0]).shape == x[:0].shape
