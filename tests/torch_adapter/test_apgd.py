"""APGD / APGD-T: the threat models' constraints, torchattacks agreement, seeding, errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from gdws_torch.robustness.apgd import (
    APGD,
    APGDT,
    _checkpoints,
    dlr_loss,
    dlr_loss_targeted,
    project_l1_box,
)
from gdws_torch.robustness.attacks import PGD, PGDL1, PGDL2, Attack
from gdws_torch.robustness.evaluate import batch_outcomes

torchattacks = pytest.importorskip("torchattacks")

N_COMPARE = 300  # samples in the torchattacks comparisons
P_NORM = {"Linf": float("inf"), "L2": 2.0, "L1": 1.0}


def digits_split():
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.long)
    return (images[:1200], labels[:1200]), (images[1200:], labels[1200:])


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


class Counting(nn.Module):
    """Wraps a model; counts the samples it is called on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.model(x)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    (x, y), test = digits_split()
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for i in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), test


def correct(model, images, labels):
    with torch.no_grad():
        return model(images).argmax(1) == labels


def small_model(n_classes: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes)).eval()


# -- constraints ------------------------------------------------------------------------

CONSTRAINED = [
    (APGD, {"norm": "Linf", "eps": 0.1}),
    (APGD, {"norm": "L2", "eps": 0.5, "loss": "dlr"}),
    (APGD, {"norm": "L1", "eps": 2.0}),
    (APGD, {"norm": "L1", "eps": 2.0, "use_largereps": True}),
    (APGDT, {"norm": "Linf", "eps": 0.1, "n_target_classes": 3}),
    (APGDT, {"norm": "L2", "eps": 0.5, "n_target_classes": 3}),
    (APGDT, {"norm": "L1", "eps": 2.0, "n_target_classes": 3}),
]


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    CONSTRAINED,
    ids=["linf", "l2-dlr", "l1", "l1-largereps", "t-linf", "t-l2", "t-l1"],
)
def test_outputs_stay_in_the_ball_and_the_pixel_box(trained, cls, kwargs):
    model, (x, y) = trained
    x, y = x[:64], y[:64]
    attack = cls(model, steps=20, n_restarts=2, **kwargs)
    adversarial = attack(x, y)
    assert adversarial.shape == x.shape and adversarial.dtype == x.dtype
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    delta = (adversarial - x).flatten(1)
    assert float(delta.norm(p=P_NORM[attack.norm], dim=1).max()) <= kwargs["eps"] * (1 + 1e-5)
    assert correct(model, adversarial, y).sum() < correct(model, x, y).sum() - 5  # it attacks


# -- strength: torchattacks and our PGD ---------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "eps", "loss"),
    [("Linf", 0.1, "ce"), ("L2", 0.5, "ce"), ("Linf", 0.1, "dlr")],
    ids=["linf-ce", "l2-ce", "linf-dlr"],
)
def test_apgd_agrees_with_torchattacks_and_beats_pgd(trained, norm, eps, loss):
    model, (x, y) = trained
    x, y = x[:N_COMPARE], y[:N_COMPARE]
    ours = correct(model, APGD(model, norm=norm, eps=eps, steps=100, loss=loss)(x, y), y)
    reference = torchattacks.APGD(model, norm=norm, eps=eps, steps=100, loss=loss, seed=0)
    theirs = correct(model, reference(x, y), y)
    clean = correct(model, x, y)
    # A meaningful operating point: the attack breaks many samples, but not all.
    assert 0.2 < float(ours.float().mean()) < float(clean.float().mean()) - 0.2
    assert abs(float(ours.float().mean() - theirs.float().mean())) <= 0.02
    assert int((ours != theirs).sum()) <= 0.03 * N_COMPARE  # the success sets mostly agree
    if loss == "ce":  # same loss as PGD (DLR trades some strength here for scale invariance)
        pgd_class = PGD if norm == "Linf" else PGDL2
        pgd = correct(model, pgd_class(model, eps, eps / 4, steps=100, seed=0)(x, y), y)
        assert float(ours.float().mean()) <= float(pgd.float().mean()) + 0.02


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 0.1), ("L2", 0.5)], ids=["linf", "l2"])
def test_apgdt_agrees_with_torchattacks(trained, norm, eps):
    model, (x, y) = trained
    x, y = x[:N_COMPARE], y[:N_COMPARE]
    ours = correct(model, APGDT(model, norm=norm, eps=eps, steps=100)(x, y), y)
    reference = torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_classes=10, seed=0)
    theirs = correct(model, reference(x, y), y)
    untargeted = correct(model, APGD(model, norm=norm, eps=eps, steps=100)(x, y), y)
    assert 0.2 < float(ours.float().mean()) < float(correct(model, x, y).float().mean()) - 0.2
    assert abs(float(ours.float().mean() - theirs.float().mean())) <= 0.02
    assert int((ours != theirs).sum()) <= 0.03 * N_COMPARE
    assert float(ours.float().mean()) <= float(untargeted.float().mean()) + 0.02


def test_l1_apgd_is_not_weaker_than_sparse_l1_pgd(trained):
    model, (x, y) = trained
    x, y = x[:N_COMPARE], y[:N_COMPARE]
    ours = correct(model, APGD(model, norm="L1", eps=2.0, steps=100)(x, y), y).float().mean()
    pgd = min(
        float(correct(model, attack(x, y), y).float().mean())
        for attack in (
            PGDL1(model, 2.0, 0.5, steps=100, sparsity=sparsity, seed=0)
            for sparsity in (0.9, 0.95, 0.99)
        )
    )
    assert 0.05 < float(ours) < float(correct(model, x, y).float().mean()) - 0.3
    assert float(ours) <= pgd + 0.02


# -- pieces -----------------------------------------------------------------------------


def bisection_projection(x, z, eps):
    """Projection onto the L1 ball in the box by bisection on the threshold (float64)."""
    x, z = x.double().flatten(1), z.double().flatten(1)
    room = torch.where(z >= 0, 1 - x, x)
    size = z.abs()

    def l1(lam):
        return torch.minimum((size - lam).clamp_min(0), room).sum(1, keepdim=True)

    low = torch.zeros(len(x), 1, dtype=torch.float64)
    high = size.amax(1, keepdim=True)
    for _ in range(200):
        middle = (low + high) / 2
        above = l1(middle) > eps
        low, high = torch.where(above, middle, low), torch.where(above, high, middle)
    lam = torch.where(l1(torch.zeros_like(low)) <= eps, torch.zeros_like(low), high)
    return z.sign() * torch.minimum((size - lam).clamp_min(0), room)


def test_l1_box_projection_is_exact():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        d = int(torch.randint(1, 200, (), generator=generator))
        x = torch.rand(6, d, generator=generator)
        x[torch.rand(6, d, generator=generator) < 0.3] = 0  # pixels at the box's bounds
        x[torch.rand(6, d, generator=generator) < 0.1] = 1
        z = torch.randn(6, d, generator=generator) * 3 * float(torch.rand((), generator=generator))
        eps = 5 * float(torch.rand((), generator=generator)) + 1e-3
        projected = project_l1_box(x, z, eps)
        assert torch.allclose(projected.double(), bisection_projection(x, z, eps), atol=1e-5)
        assert float(projected.abs().sum(1).max()) <= eps * (1 + 1e-6)
        assert float((x + projected).min()) >= 0 and float((x + projected).max()) <= 1
        # Optimality: <z - p, q - p> <= 0 for feasible q (here q = 0 and q = p / 2).
        for q in (torch.zeros_like(projected), projected / 2):
            assert float(((z - projected) * (q - projected)).sum(1).max()) <= 1e-4


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (then 1.05 > 1).
    assert _checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert _checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]  # ceil(p_j * 10), repeats dropped
    assert _checkpoints(1) == [1]


class Bowl(nn.Module):
    """Three logits whose cross-entropy for class 0 peaks at ``centre``: a maximum inside
    the ball, where steps of a fixed size oscillate and only shrinking steps converge."""

    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = -10 * ((x - self.centre) ** 2).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(height), height, height - 1], 1)


@pytest.mark.parametrize(("norm", "eps", "tolerance"), [("Linf", 0.1, 0.02), ("L2", 0.5, 0.005)])
def test_step_size_halves_until_an_interior_maximum_is_found(monkeypatch, norm, eps, tolerance):
    x = torch.full((4, 1, 8, 8), 0.5)
    offset = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = float("inf") if norm == "Linf" else 2.0
    offset = offset / offset.flatten(1).norm(p=p, dim=1).view(-1, 1, 1, 1) * eps / 2
    model = Bowl(x + offset)
    labels = torch.zeros(4, dtype=torch.long)

    def distance(attack):
        return float((attack(x, labels) - x - offset).flatten(1).norm(dim=1).max())

    assert distance(APGD(model, norm=norm, eps=eps, steps=100)) < tolerance
    # Without the checkpoints (no halving) it keeps oscillating at the initial 2 * eps.
    monkeypatch.setattr("gdws_torch.robustness.apgd._checkpoints", lambda steps: [])
    assert distance(APGD(model, norm=norm, eps=eps, steps=100)) > 10 * tolerance


def test_dlr_losses_by_hand():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0], [1.0, 5.0, 2.0, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 2])
    # Sample 0: correct, margin 4 - 3 over z_pi1 - z_pi3 = 4 - 1. Sample 1: 2 - 5 over 5 - 1.
    expected = torch.tensor([-(4 - 3) / 3, -(2 - 5) / 4])
    assert torch.allclose(dlr_loss(logits, labels), expected)
    assert torch.allclose(dlr_loss(3 * logits + 7, labels), expected)  # shift/scale invariant
    targets = torch.tensor([1, 3])
    expected = torch.tensor([-(4 - 1) / (4 - 0.5), -(2 - 0.5) / (5 - 0.75)])
    assert torch.allclose(dlr_loss_targeted(logits, labels, targets), expected)
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(logits[:, :2], labels.clamp(max=1))
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr_loss_targeted(logits[:, :3], labels, targets.clamp(max=2))


# -- seeding, batching, the model's state ---------------------------------------------


def test_deterministic_with_a_seed(trained):
    model, (x, y) = trained
    x, y = x[:64], y[:64]
    first = APGD(model, eps=0.1, steps=10, seed=3)(x, y)
    assert torch.equal(first, APGD(model, eps=0.1, steps=10, seed=3)(x, y))
    assert not torch.equal(first, APGD(model, eps=0.1, steps=10, seed=4)(x, y))
    # eot_iter averages identical gradients on a deterministic model: the same attack.
    assert torch.equal(first, APGD(model, eps=0.1, steps=10, seed=3, eot_iter=2)(x, y))


@pytest.mark.parametrize(
    "attack",
    [
        lambda m: APGD(m, eps=0.1, steps=30, n_restarts=2),
        lambda m: APGD(m, norm="L1", eps=1.0, steps=30, n_restarts=2),
        lambda m: APGDT(m, norm="L2", eps=0.5, steps=20, n_target_classes=3),
    ],
    ids=["linf", "l1", "t-l2"],
)
def test_sample_ids_make_results_independent_of_batching(trained, attack):
    model, (x, y) = trained
    x, y = x[:64], y[:64]
    attack = attack(model)
    ids = torch.arange(100, 164)
    whole = attack(x, y, sample_ids=ids)
    halves = torch.cat(
        [attack(x[:32], y[:32], sample_ids=ids[:32]), attack(x[32:], y[32:], sample_ids=ids[32:])]
    )
    assert torch.equal(whole, halves)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole[order], attack(x[order], y[order], sample_ids=ids[order]))
    # The ids do seed the starts: other ids, another attack (the batch seed differs too).
    assert not torch.equal(whole, attack(x, y, sample_ids=ids + 1000))
    assert not torch.equal(whole, attack(x, y))


def test_evaluate_passes_sample_ids_to_apgd(trained):
    model, (x, y) = trained
    x, y = x[:32], y[:32]
    attack = APGD(model, eps=0.1, steps=10, seed=5)
    assert isinstance(attack, Attack)  # what evaluate() checks before passing sample_ids
    ids = torch.arange(7, 39)
    outcomes = batch_outcomes(model, x, y, {"apgd": attack}, sample_ids=ids)
    assert torch.equal(outcomes[:, 1], correct(model, attack(x, y, sample_ids=ids), y))


@pytest.mark.parametrize("cls", [APGD, APGDT])
def test_eval_mode_restored_and_parameters_untouched(trained, cls):
    model, (x, y) = trained
    model.train()
    grads = {}
    for name, parameter in model.named_parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
        grads[name] = parameter.grad.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    hook = model.register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
    try:
        cls(model, eps=0.1, steps=5)(x[:32], y[:32])
    finally:
        hook.remove()
        trained_modes = [module.training for module in model.modules()]
        model.eval()
    assert seen and not any(seen)  # every forward pass in eval mode
    assert all(trained_modes)  # modes restored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats too
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, grads[name])
        parameter.grad = None


def test_restarts_run_only_on_samples_not_yet_broken(trained):
    model, (x, y) = trained
    x, y = x[:64], y[:64]
    counting = Counting(model)
    steps, restarts = 10, 3
    adversarial = APGD(counting, eps=0.1, steps=steps, n_restarts=restarts)(x, y)
    broken_first = ~correct(model, APGD(model, eps=0.1, steps=steps)(x, y), y)
    # Clean pass, then each run: (steps + 1) passes over the samples still standing.
    assert int(broken_first.sum()) > 10
    assert counting.samples <= 64 + (steps + 1) * (64 + 2 * int((~broken_first).sum()))
    assert int((~correct(model, adversarial, y)).sum()) >= int(broken_first.sum())
    # APGD-T: one run per target class, on the samples still standing.
    standing = correct(model, APGDT(model, eps=0.1, steps=steps, n_target_classes=1)(x, y), y)
    assert int(standing.sum()) < 50
    counting.samples = 0
    APGDT(counting, eps=0.1, steps=steps, n_target_classes=9)(x, y)
    n_correct = int(correct(model, x, y).sum())
    assert counting.samples <= 64 + (steps + 1) * (n_correct + 8 * int(standing.sum()))


def test_misclassified_samples_are_returned_unchanged(trained):
    model, (x, y) = trained
    wrong = y.clone()
    wrong[:16] = (y[:16] + 1) % 10  # labels the model does not predict
    clean_wrong = ~correct(model, x[:16], wrong[:16])
    adversarial = APGD(model, eps=0.1, steps=5)(x[:16], wrong[:16])
    assert bool(clean_wrong.all())
    assert torch.equal(adversarial, x[:16])


def test_empty_batch_and_repr(trained):
    model, (x, y) = trained
    attack = APGD(model, norm="L2", eps=0.5, steps=7, n_restarts=2, loss="dlr", seed=1)
    assert attack(x[:0], y[:0]).shape == (0, 1, 8, 8)
    assert repr(attack) == (
        "APGD(norm='L2', eps=0.5, steps=7, n_restarts=2, loss='dlr', rho=0.75, eot_iter=1, "
        "use_largereps=False, seed=1)"
    )
    assert repr(APGDT(model, norm="L1", eps=2, use_largereps=True)) == (
        "APGDT(norm='L1', eps=2, steps=100, n_restarts=1, loss='dlr-targeted', rho=0.75, "
        "eot_iter=1, use_largereps=True, n_target_classes=9, seed=0)"
    )


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, "eps must be"),
        ({"eps": -1.0}, ValueError, "eps must be"),
        ({"eps": "8/255"}, TypeError, "eps must be"),
        ({"norm": "Lp"}, ValueError, "norm must be 'Linf', 'L2' or 'L1'; got 'Lp'"),
        ({"norm": 2}, TypeError, "norm must be"),
        ({"loss": "hinge"}, ValueError, "loss must be 'ce' or 'dlr'; got 'hinge'"),
        ({"steps": 0}, ValueError, "steps must be"),
        ({"steps": 2.5}, TypeError, "steps must be"),
        ({"n_restarts": 0}, ValueError, "n_restarts must be"),
        ({"rho": 1.5}, ValueError, "rho must be"),
        ({"eot_iter": 0}, ValueError, "eot_iter must be"),
        ({"seed": -1}, ValueError, "seed must be"),
        ({"seed": None}, TypeError, r"seed must be an integer >= 0; got None"),
        ({"use_largereps": True}, ValueError, "use_largereps is for the L1"),
        ({"use_largereps": 1}, TypeError, "use_largereps must be a bool"),
    ],
)
def test_bad_arguments(trained, kwargs, error, match):
    model, _ = trained
    with pytest.raises(error, match=match):
        APGD(model, **kwargs)


def test_bad_targeted_arguments(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="n_target_classes must be"):
        APGDT(model, n_target_classes=0)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        APGDT(lambda images: images)


def test_bad_inputs(trained):
    model, (x, y) = trained
    x, y = x[:8], y[:8]
    attack = APGD(model, eps=0.1, steps=2)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        attack(x * 2, y)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        attack(x - 0.5, y)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\).*got 10"):
        attack(x, torch.full_like(y, 10))
    with pytest.raises(ValueError, match="class indices >= 0"):
        attack(x, torch.full_like(y, -1))
    with pytest.raises(TypeError, match=r"labels must be a torch\.LongTensor"):
        attack(x, y.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        attack(x, y[:4])
    with pytest.raises(ValueError, match="sample_ids must be 8 integer"):
        attack(x, y, sample_ids=range(4))


def test_dlr_needs_enough_classes():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"loss='dlr' needs at least 3 classes.*returns 2"):
        APGD(small_model(2), eps=0.1, steps=2, loss="dlr")(x, torch.tensor([0, 1, 0, 1]))
    APGD(small_model(2), eps=0.1, steps=2, loss="ce")(x, torch.tensor([0, 1, 0, 1]))  # fine
    with pytest.raises(ValueError, match=r"APGDT.*needs at least 4 classes.*returns 3"):
        APGDT(small_model(3), eps=0.1, steps=2)(x, torch.tensor([0, 1, 2, 1]))
    three = APGD(small_model(3), eps=0.1, steps=2, loss="dlr")(x, torch.tensor([0, 1, 2, 1]))
    assert three.shape == x.shape
