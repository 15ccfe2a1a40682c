"""Attacks: the threat models' constraints, torchattacks agreement, union accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn

from gdws_torch.robustness.attacks import PGD, PGDL1, PGDL2, project_l1_ball
from gdws_torch.robustness.evaluate import evaluate


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


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    (x, y), test = digits_split()
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), test


ATTACKS = [
    (PGD, {"eps": 0.1, "alpha": 0.02}),
    (PGDL2, {"eps": 0.5, "alpha": 0.1}),
    (PGDL1, {"eps": 2.0, "alpha": 0.5, "sparsity": 0.9}),
]


@pytest.mark.parametrize(("cls", "kwargs"), ATTACKS, ids=["linf", "l2", "l1"])
def test_perturbations_stay_in_the_ball_and_the_pixel_box(trained, cls, kwargs):
    model, (x, y) = trained
    attack = cls(model, steps=5, n_restarts=2, seed=0, **kwargs)
    adversarial = attack(x[:64], y[:64])
    delta = (adversarial - x[:64]).flatten(1)
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    p = {"Linf": float("inf"), "L2": 2, "L1": 1}[attack.norm]
    assert float(delta.norm(p=p, dim=1).max()) <= kwargs["eps"] * (1 + 1e-5)
    with torch.no_grad():
        clean = (model(x[:64]).argmax(1) == y[:64]).float().mean()
        robust = (model(adversarial).argmax(1) == y[:64]).float().mean()
    assert robust < clean  # it attacks


def test_linf_pgd_agrees_with_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, (x, y) = trained
    ours = evaluate(
        model, [(x, y)], {"pgd": PGD(model, 0.1, 0.02, steps=20, seed=0)}, progress=False
    )
    torch.manual_seed(0)
    theirs_attack = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=20, random_start=True)
    theirs = evaluate(model, [(x, y)], {"pgd": theirs_attack}, progress=False)
    assert ours["natural"] == theirs["natural"] > 90
    assert 5 < ours["attacks"]["pgd"] < ours["natural"] - 10  # a meaningful operating point
    assert abs(ours["attacks"]["pgd"] - theirs["attacks"]["pgd"]) <= 1.0


def test_union_counts_samples_surviving_every_attack(trained):
    model, (x, y) = trained
    built = [cls(model, steps=5, seed=0, **kw) for cls, kw in ATTACKS]
    attacks = {attack.norm: attack for attack in built}
    result = evaluate(
        model, [(x[:100], y[:100]), (x[100:200], y[100:200])], attacks, progress=False
    )
    assert result["n_samples"] == 200
    assert result["union"] <= min(result["attacks"].values())
    # By hand, batch by batch as evaluate() went: correct naturally and under each attack.
    survived = []
    for batch in (slice(0, 100), slice(100, 200)):
        ok = model(x[batch]).argmax(1) == y[batch]
        for attack in attacks.values():
            ok &= model(attack(x[batch], y[batch])).argmax(1) == y[batch]
        survived.append(ok)
    assert result["union"] == pytest.approx(100 * float(torch.cat(survived).float().mean()))


def test_restarts_keep_the_worst_case_and_early_stop_freezes_broken_samples(trained):
    model, (x, y) = trained
    one = PGD(model, 0.08, 0.02, steps=3, n_restarts=1, seed=1)(x[:128], y[:128])
    many = PGD(model, 0.08, 0.02, steps=3, n_restarts=4, seed=1)(x[:128], y[:128])
    with torch.no_grad():
        wrong_one = model(one).argmax(1) != y[:128]
        wrong_many = model(many).argmax(1) != y[:128]
    assert bool((wrong_many | ~wrong_one).all())  # what one restart breaks, four break too
    stopped = PGD(model, 0.08, 0.02, steps=10, early_stop=True, seed=2)
    adversarial = stopped(x[:128], y[:128])
    with torch.no_grad():
        assert float((model(adversarial).argmax(1) != y[:128]).float().mean()) > 0


def test_attack_restores_modes_and_leaves_parameters_alone(trained):
    model, (x, y) = trained
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PGD(model, 0.1, 0.02, steps=2)(x[:16], y[:16])
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()


@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12),
    st.floats(0.01, 10),
)
def test_l1_projection_is_the_closest_point_of_the_ball(values, eps):
    v = torch.tensor([values], dtype=torch.float64)
    projected = project_l1_ball(v, eps)[0]
    assert float(projected.abs().sum()) <= eps * (1 + 1e-9)
    if float(v.abs().sum()) <= eps:
        assert torch.equal(projected, v[0])
        return
    # KKT: soft-thresholding by a common theta, on the sphere.
    assert float(projected.abs().sum()) == pytest.approx(eps, rel=1e-9)
    theta = (v[0].abs() - projected.abs())[projected != 0]
    if theta.numel():
        assert float(theta.max() - theta.min()) <= 1e-9 * max(1.0, eps)
        # And no other point of the sphere nearby is closer (random feasible points).
        rng = np.random.default_rng(0)
        for _ in range(20):
            other = torch.tensor(rng.standard_normal(v.shape[1]))
            other = other / other.abs().sum() * eps
            assert float((other - v[0]).norm()) >= float((projected - v[0]).norm()) - 1e-9


def test_bad_input(trained):
    model, (x, y) = trained
    with pytest.raises(ValueError, match=r"eps must be a finite real number > 0 and <= 1 \(pixel"):
        PGD(model, eps=0, alpha=0.1)
    with pytest.raises(TypeError, match=r"alpha must be .* got '0\.1' \(str\)"):
        PGD(model, eps=0.1, alpha="0.1")
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got -1"):
        PGD(model, 0.1, 0.1, steps=-1)
    with pytest.raises(TypeError, match=r"steps must be an integer >= 1; got 2\.0 \(float\)"):
        PGD(model, 0.1, 0.1, steps=2.0)
    with pytest.raises(ValueError, match="n_restarts must be an integer >= 1; got 0"):
        PGD(model, 0.1, 0.1, n_restarts=0)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\); got 1\.0"):
        PGDL1(model, 1.0, 0.1, sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\); got -0\.5"):
        PGDL1(model, 1.0, 0.1, sparsity=-0.5)
    with pytest.raises(TypeError, match=r"sparsity .* got True \(bool\)"):
        PGDL1(model, 1.0, 0.1, sparsity=True)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        PGD("model", 0.1, 0.1)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        PGD(model, 0.1, 0.1)(x[:4] * 2 - 1, y[:4])
    with pytest.raises(TypeError, match="labels"):
        PGD(model, 0.1, 0.1)(x[:4], y[:4].float())
    with pytest.raises(ValueError, match="shape"):
        PGD(model, 0.1, 0.1)(x[:4], y[:3])


@pytest.mark.parametrize(("cls", "kwargs"), ATTACKS, ids=["linf", "l2", "l1"])
def test_an_empty_batch_comes_back_empty(trained, cls, kwargs):
    model, (x, y) = trained
    attack = cls(model, steps=2, seed=0, **kwargs)
    for ids in (None, torch.zeros(0, dtype=torch.long)):
        out = attack(x[:0], y[:0], sample_ids=ids)
        assert out.shape == (0, *x.shape[1:]) and out.dtype == x.dtype


@pytest.mark.parametrize(
    ("subclass", "norm", "kwargs"),
    [(PGDL2, "L2", {"eps": 0.5, "alpha": 0.1}), (PGDL1, "L1", {"eps": 2.0, "alpha": 0.5})],
)
def test_pgdl2_and_pgdl1_are_pgd_with_that_norm(trained, subclass, norm, kwargs):
    model, (x, y) = trained
    named = subclass(model, steps=3, n_restarts=2, seed=5, **kwargs)
    keyword = PGD(model, steps=3, n_restarts=2, seed=5, norm=norm, **kwargs)
    assert isinstance(named, PGD) and named.norm == norm
    ids = torch.arange(16) + 100
    assert torch.equal(named(x[:16], y[:16]), keyword(x[:16], y[:16]))
    assert torch.equal(
        named(x[:16], y[:16], sample_ids=ids), keyword(x[:16], y[:16], sample_ids=ids)
    )


def test_sparsity_is_for_l1_only_and_old_norm_spellings_are_refused(trained):
    model, _ = trained
    assert PGD(model, norm="L1").sparsity == 0.99
    with pytest.raises(ValueError, match="sparsity is for norm='L1'"):
        PGD(model, norm="L2", sparsity=0.9)
    with pytest.raises(ValueError, match=r"norm must be 'Linf', 'L2' or 'L1'; got 'l_inf'"):
        PGD(model, norm="l_inf")
    with pytest.raises(TypeError, match="random_start must be a bool; got 1 \\(int\\)"):
        PGD(model, random_start=1)
