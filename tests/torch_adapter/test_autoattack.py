"""AutoAttack and the gradient-masking checks: torchattacks agreement, the cascade, seeds,
evaluation (sharded, resumed), the checks firing on broken models, bad input."""

from __future__ import annotations

import pytest
import torch
from test_apgd import Counting, DigitsNet, digits_split
from torch import nn
from torch.utils.data import TensorDataset

from gdws_torch import APGD, APGDT, FAB, PGD, AutoAttack, Square, check_gradient_masking
from gdws_torch.robustness.autoattack import AutoAttackReport
from gdws_torch.robustness.evaluate import batch_outcomes, evaluate, evaluate_dataset
from gdws_torch.robustness.masking import MaskingReport

torchattacks = pytest.importorskip("torchattacks")

EPS = 0.1  # Linf, on 8x8 digits: about half the test digits stay robust
N_STANDARD = 100  # samples of the standard-ensemble comparison (Square's 5000 queries)
N_REDUCED = 300  # samples of the reduced-ensemble comparison
SMALL = {"version": "custom", "steps": 5, "n_queries": 40, "n_target_classes": 2}
ALL_FOUR = ["apgd-ce", "apgd-t", "fab-t", "square"]


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


@pytest.fixture(scope="module")
def standard_run(trained):
    """Our standard AutoAttack on the first N_STANDARD test digits (shared: it is slow)."""
    model, (x, y) = trained
    x, y = x[:N_STANDARD], y[:N_STANDARD]
    attack = AutoAttack(model, norm="Linf", eps=EPS)
    result = attack.run(x, y)
    return model, x, y, result


def correct(model, images, labels):
    with torch.no_grad():
        return model(images).argmax(1) == labels


# -- composition ------------------------------------------------------------------------


def test_standard_and_fast_compose_the_original_attacks(trained):
    model, _ = trained
    standard = AutoAttack(model, norm="Linf", eps=8 / 255)
    assert standard.stage_names == ("APGD-CE", "APGD-T", "FAB-T", "Square")
    apgd, apgdt, fab, square = (attack for _, attack in standard.stages)
    assert isinstance(apgd, APGD) and (apgd.loss, apgd.steps, apgd.n_restarts) == ("ce", 100, 1)
    assert isinstance(apgdt, APGDT) and (apgdt.steps, apgdt.n_target_classes) == (100, 9)
    assert isinstance(fab, FAB) and fab.targeted and fab.steps == 100
    assert fab.n_target_classes == 9 and fab.final_search_steps == 0  # AutoAttack's FAB
    assert isinstance(square, Square) and (square.n_queries, square.p_init) == (5000, 0.8)
    assert {a.seed for _, a in standard.stages} == {0}
    assert AutoAttack(model, "L2", 0.5, version="fast").stage_names == ("APGD-CE", "APGD-T")
    l1 = AutoAttack(model, "L1", 12.0)  # the original's L1 standard version
    assert l1.stage_names == ("APGD-CE", "APGD-T")
    (_, ce), (_, targeted) = l1.stages
    assert ce.norm == "L1" and ce.n_restarts == 5 and ce.use_largereps
    assert targeted.use_largereps and targeted.n_restarts == 1
    custom = AutoAttack(
        model, eps=0.1, version="custom", attacks=["square", ("pgd", PGD(model, 0.1, 0.02))]
    )
    assert custom.stage_names == ("Square", "pgd")
    assert "APGD-CE" in repr(standard)


def test_standard_agrees_with_torchattacks_at_the_original_settings(standard_run):
    model, x, y, ours = standard_run
    # torchattacks' AutoAttack runs APGD, APGD-T and FAB with 10 steps; the standard
    # version (and ours) with 100.
    reference = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, n_classes=10, seed=0)
    for attack in reference._autoattack.attacks[:3]:
        attack.steps = 100
    theirs = correct(model, reference(x, y), y)
    mine = correct(model, ours.adversarial, y)
    assert 0.2 < float(mine.float().mean()) < float(correct(model, x, y).float().mean()) - 0.2
    assert abs(float(mine.float().mean() - theirs.float().mean())) <= 0.01  # within 1 point
    assert int((mine != theirs).sum()) <= 2  # the same samples broken, but for a few


def test_reduced_ensemble_agrees_with_torchattacks(trained):
    model, (x, y) = trained
    x, y = x[:N_REDUCED], y[:N_REDUCED]
    ours = AutoAttack(model, eps=EPS, version="custom", attacks=ALL_FOUR, steps=10, n_queries=1000)(
        x, y
    )
    reference = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, n_classes=10, seed=0)
    reference._autoattack.attacks[3].n_queries = 1000  # its defaults: 10 steps, as ours here
    mine, theirs = correct(model, ours, y), correct(model, reference(x, y), y)
    assert abs(float(mine.float().mean() - theirs.float().mean())) <= 0.01
    assert int((mine != theirs).sum()) <= 0.02 * N_REDUCED


def test_the_report_is_the_per_sample_worst_case(standard_run):
    model, x, y, result = standard_run
    report, adversarial = result.report, result.adversarial
    assert isinstance(report, AutoAttackReport) and report.n_samples == N_STANDARD
    robust = correct(model, adversarial, y)
    assert report.robust_accuracy == pytest.approx(100 * float(robust.float().mean()))
    assert torch.equal(robust, report.broken_by == len(report.attacks))
    assert torch.equal(report.clean_correct, correct(model, x, y))
    accuracies = list(report.accuracy_by_attack.values())
    assert accuracies == sorted(accuracies, reverse=True)  # cumulative: never increases
    assert accuracies[-1] == report.robust_accuracy
    assert report.natural_accuracy - accuracies[0] == pytest.approx(
        100 * report.broken_counts["APGD-CE"] / N_STANDARD
    )
    # Robust and clean-misclassified samples come back unperturbed; broken ones in the ball.
    unchanged = (adversarial == x).flatten(1).all(1)
    assert bool(unchanged[report.broken_by == len(report.attacks)].all())
    assert bool(unchanged[report.broken_by == -1].all())
    assert float((adversarial - x).abs().max()) <= EPS + 1e-6
    names = report.broken_by_names()
    assert names.count(None) == int(robust.sum()) and names.count("natural") == int(
        (~report.clean_correct).sum()
    )
    plain = report.to_dict()
    assert plain["robust_accuracy"] == report.robust_accuracy and len(plain["broken_by"]) == 100
    assert report.format().startswith(f"{N_STANDARD} samples: natural")


def test_fast_is_the_first_two_attacks_of_standard(standard_run, trained):
    model, x, y, standard = standard_run
    fast = AutoAttack(model, eps=EPS, version="fast")
    fast(x, y)
    report = fast.last_report
    assert report.attacks == ("APGD-CE", "APGD-T")
    expected = standard.report.broken_by.clone()
    expected[expected > 1] = 2  # broken later (FAB-T, Square) or robust: robust here
    assert torch.equal(report.broken_by, expected)


# -- the cascade --------------------------------------------------------------------------


class Recording:
    """A stand-in attack: records the sample ids it is given and, for the ids in
    ``breaks``, returns a correctly classified digit of another class (misclassified).
    It declares that it takes ``sample_ids``, as the library's attacks do."""

    seeds_per_sample = True

    def __init__(self, breaks, donors) -> None:
        self.breaks, self.donors, self.seed, self.seen = breaks, donors, 0, []

    def __call__(self, images, labels, *, sample_ids=None):
        self.seen.append(sample_ids.tolist())
        out = images.clone()
        for row, sample in enumerate(sample_ids.tolist()):
            if sample in self.breaks:
                out[row] = self.donors[sample]
        return out


def test_each_attack_runs_only_on_samples_still_correct(trained):
    model, (x, y) = trained
    x, y = x[:40], y[:40]
    clean = correct(model, x, y)
    assert not bool(clean.all())  # some samples are misclassified unperturbed
    correct_ids = [i for i in range(40) if bool(clean[i])]
    donors = {i: x[next(j for j in correct_ids if y[j] != y[i])] for i in range(40)}
    first = Recording(set(correct_ids[:10]), donors)
    second = Recording(set(correct_ids[5:20]), donors)
    third = Recording(set(), donors)
    counting = Counting(model)
    ensemble = AutoAttack(
        counting,
        eps=1.0,  # the donors are far away: any image is in the ball
        version="custom",
        attacks=[("first", first), ("second", second), ("third", third)],
    )
    ensemble(x, y, sample_ids=torch.arange(40))
    report = ensemble.last_report
    assert first.seen == [correct_ids]  # samples misclassified unperturbed are never attacked
    assert second.seen == [correct_ids[10:]]  # nor those an earlier attack broke
    assert third.seen == [correct_ids[20:]]
    assert report.broken_counts == {"first": 10, "second": 10, "third": 0}
    assert [int(report.broken_by[i]) for i in range(40) if not bool(clean[i])] == [-1] * (
        40 - len(correct_ids)
    )
    # The model saw the clean batch once, then each attack's candidates once (the check).
    assert counting.samples == 40 + sum(len(attack.seen[0]) for attack in (first, second, third))


def test_sample_ids_make_sharded_runs_agree_with_the_whole_batch(trained):
    model, (x, y) = trained
    x, y, ids = x[:60], y[:60], torch.arange(100, 160)
    attack = AutoAttack(model, eps=EPS, attacks=ALL_FOUR, **SMALL)
    whole = attack.run(x, y, sample_ids=ids)
    parts = [
        attack.run(x[i : i + 25], y[i : i + 25], sample_ids=ids[i : i + 25]) for i in (0, 25, 50)
    ]
    assert torch.equal(torch.cat([p.adversarial for p in parts]), whole.adversarial)
    assert torch.equal(torch.cat([p.report.broken_by for p in parts]), whole.report.broken_by)


def test_evaluate_dataset_shards_and_resumes_with_autoattack(trained, tmp_path):
    model, (x, y) = trained
    data = TensorDataset(x[:45], y[:45])
    attacks = {
        "aa": AutoAttack(model, eps=EPS, attacks=["apgd-ce", "apgd-t", "square"], **SMALL),
        "pgd": PGD(model, EPS, 0.02, steps=3, seed=0),
    }
    whole = evaluate_dataset(model, data, attacks, batch_size=45, progress=False)
    assert list(whole["by_attack"]["aa"]) == ["APGD-CE", "APGD-T", "Square"]
    assert whole["by_attack"]["aa"]["Square"] == whole["attacks"]["aa"]
    assert whole["union"] <= min(whole["attacks"].values())
    assert evaluate_dataset(model, data, attacks, batch_size=7, progress=False) == whole
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    plain = evaluate(model, loader, attacks, progress=False)  # batch seeds: close, not equal
    assert list(plain["by_attack"]["aa"]) == ["APGD-CE", "APGD-T", "Square"]
    assert plain["by_attack"]["aa"]["Square"] == plain["attacks"]["aa"]
    # A run stopped part way resumes to the same result.
    folder = tmp_path / "partial"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = attacks["aa"].forward

    def interrupted(images, labels, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Stop
        return original(images, labels, **kwargs)

    attacks["aa"].forward = interrupted
    with pytest.raises(Stop):
        evaluate_dataset(
            model, data, attacks, batch_size=7, resume_dir=folder, save_every_s=0, progress=False
        )
    del attacks["aa"].forward
    resumed = evaluate_dataset(
        model, data, attacks, batch_size=7, resume_dir=folder, progress=False
    )
    assert resumed["resumed"] == 21 and {**resumed, "resumed": 0} == whole
    other = {"aa": AutoAttack(model, eps=EPS, attacks=["apgd-ce", "apgd-t"], **SMALL)}
    with pytest.raises(ValueError, match="another evaluation"):
        evaluate_dataset(model, data, other, batch_size=7, resume_dir=folder, progress=False)


def test_batch_outcomes_add_a_column_per_attack_of_the_ensemble(trained):
    model, (x, y) = trained
    attack = AutoAttack(model, eps=EPS, attacks=["apgd-ce", "square"], **SMALL)
    outcomes = batch_outcomes(model, x[:30], y[:30], {"aa": attack}, torch.arange(30))
    assert outcomes.shape == (30, 4)
    broken_by = attack.last_report.broken_by
    assert torch.equal(outcomes[:, 2], broken_by > 0) and torch.equal(outcomes[:, 3], broken_by > 1)
    assert torch.equal(outcomes[:, 1], outcomes[:, 3])


def test_modes_restored_and_parameters_untouched(trained):
    model, (x, y) = trained
    model.zero_grad(set_to_none=True)  # torchattacks' FAB leaves .grad behind
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    AutoAttack(model, eps=EPS, attacks=ALL_FOUR, **SMALL)(x[:20], y[:20])
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_empty_batch(trained):
    model, (x, y) = trained
    attack = AutoAttack(model, eps=EPS)
    out = attack(x[:0], y[:0])
    assert out.shape == (0, 1, 8, 8) and attack.last_report.n_samples == 0
    assert attack.last_report.to_dict()["robust_accuracy"] is None


# -- gradient masking -----------------------------------------------------------------------


class Softmaxed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


class Quantised(nn.Module):
    """Inputs rounded to 4 levels first: zero gradient almost everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 3) / 3)


class Noisy(nn.Module):
    """Fresh input noise on every call, in eval mode too: a randomised defence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x + 0.3 * torch.randn_like(x)).clamp(0, 1))


def test_masking_checks_stay_quiet_on_a_sound_model(standard_run):
    model, x, y, result = standard_run
    report = check_gradient_masking(model, x, y, by_attack=result.report)
    assert isinstance(report, MaskingReport) and not report.flagged, report.format()
    assert [c.name for c in report.checks] == [
        "black_box",
        "zero_gradients",
        "probabilities",
        "nondeterminism",
    ]
    assert report["zero_gradients"].value == 0 and report["black_box"].flagged is False
    text = report.format()
    assert text.count("\n") == 4 and "[FLAG]" not in text
    assert MaskingReport.from_dict(report.to_dict()) == report


def test_a_softmax_model_is_flagged_and_refused(trained):
    model, (x, y) = trained
    softmaxed = Softmaxed(model).eval()
    report = check_gradient_masking(softmaxed, x[:50], y[:50])
    assert report["probabilities"].flagged and report.flagged
    assert "probabilities, not logits" in report["probabilities"].verdict
    with pytest.raises(ValueError, match="model returns probabilities, not logits"):
        AutoAttack(softmaxed, eps=EPS)(x[:10], y[:10])


def test_a_quantising_model_has_zero_gradients_and_square_beats_apgd_on_it(trained):
    model, (x, y) = trained
    quantised = Quantised(model).eval()
    x, y = x[:60], y[:60]
    ensemble = AutoAttack(
        quantised, eps=0.2, version="custom", attacks=["apgd-ce", "square"], steps=10,
        n_queries=200,
    )  # fmt: skip
    ensemble(x, y)
    by_attack = ensemble.last_report.accuracy_by_attack
    assert by_attack["Square"] < by_attack["APGD-CE"] - 5  # the black box does what APGD can't
    report = check_gradient_masking(quantised, x, y, by_attack=ensemble.last_report)
    assert report["zero_gradients"].flagged and report["zero_gradients"].value == 1.0
    assert report["black_box"].flagged and "masked" in report["black_box"].verdict
    assert not report["probabilities"].flagged and not report["nondeterminism"].flagged


def test_a_randomised_model_is_flagged(trained):
    model, (x, y) = trained
    report = check_gradient_masking(Noisy(model).eval(), x[:50], y[:50])
    assert report["nondeterminism"].flagged and "randomised" in report["nondeterminism"].verdict
    assert not report["zero_gradients"].flagged


def test_black_box_check_from_plain_accuracies(trained):
    model, (x, y) = trained
    quiet = {"APGD-CE": 50.0, "APGD-T": 48.0, "FAB-T": 48.0, "Square": 48.0}
    loud = {**quiet, "Square": 46.0}
    check = check_gradient_masking(model, x[:20], y[:20], by_attack=quiet)["black_box"]
    assert check.flagged is False and check.value == 0
    check = check_gradient_masking(model, x[:20], y[:20], by_attack=loud)["black_box"]
    assert check.flagged and check.value == pytest.approx(2.0)
    nested = {"Linf": quiet, "L2": loud}
    check = check_gradient_masking(model, x[:20], y[:20], by_attack=nested)["black_box"]
    assert check.flagged and "(L2)" in check.verdict
    fast = {"APGD-CE": 50.0, "APGD-T": 48.0}
    assert (
        check_gradient_masking(model, x[:20], y[:20], by_attack=fast)["black_box"].flagged is None
    )
    assert check_gradient_masking(model, x[:20], y[:20])["black_box"].flagged is None


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0}, ValueError, r"eps must be a finite real number > 0"),
        ({"eps": -1.0}, ValueError, r"eps must be a finite real number > 0"),
        ({"norm": "L3"}, ValueError, r"norm must be 'Linf', 'L2' or 'L1'; got 'L3'"),
        ({"norm": 2}, TypeError, r"norm must be 'Linf', 'L2' or 'L1'; got 2 \(int\)"),
        ({"version": "plus"}, ValueError, r"version must be one of .* got 'plus'"),
        ({"attacks": ["square"]}, ValueError, r"attacks is for version='custom'"),
        ({"steps": 10}, ValueError, r"steps is for version='custom'"),
        ({"version": "custom"}, ValueError, r"version='custom' needs attacks"),
        ({"version": "custom", "attacks": ["pgd"]}, ValueError, r"unknown attack 'pgd'"),
        ({"version": "custom", "attacks": [3]}, TypeError, r"must be callable"),
        (
            {"version": "custom", "attacks": ["square"], "norm": "L1"},
            ValueError,
            r"'square' has no L1 version",
        ),
        ({"version": "custom", "attacks": ["square", "square"]}, ValueError, "distinct labels"),
        ({"seed": -1}, ValueError, r"seed must be an integer >= 0"),
        ({"seed": None}, TypeError, r"seed must be an integer >= 0; got None"),
        ({"n_target_classes": 0}, ValueError, r"n_target_classes must be an integer >= 1"),
    ],
)
def test_bad_arguments(trained, kwargs, error, match):
    model, _ = trained
    with pytest.raises(error, match=match):
        AutoAttack(model, **{"eps": EPS, **kwargs})


def test_bad_inputs(trained):
    model, (x, y) = trained
    attack = AutoAttack(model, eps=EPS, version="fast")
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        attack(x[:4] * 2 - 0.5, y[:4])
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\).*got 12"):
        attack(x[:4], torch.tensor([1, 2, 3, 12]))
    with pytest.raises(ValueError, match=r"labels must be class indices >= 0; got -1"):
        attack(x[:4], torch.tensor([1, 2, 3, -1]))
    with pytest.raises(TypeError, match=r"labels must be a torch\.LongTensor"):
        attack(x[:4], y[:4].float())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        AutoAttack("model", eps=EPS)
    with pytest.raises(ValueError, match="at least one sample"):
        check_gradient_masking(model, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"zero_gradient_threshold must be"):
        check_gradient_masking(model, x[:4], y[:4], zero_gradient_threshold=2)
    with pytest.raises(TypeError, match="by_attack must be"):
        check_gradient_masking(model, x[:4], y[:4], by_attack=[1, 2])


def test_an_attack_leaving_the_ball_is_an_error(trained):
    model, (x, y) = trained

    def too_far(images, labels):
        return (images + 0.5).clamp(0, 1)

    with pytest.raises(RuntimeError, match=r"'too_far' returned images outside the Linf ball"):
        AutoAttack(model, eps=EPS, version="custom", attacks=[("too_far", too_far)])(x[:8], y[:8])


# -- the shipped demo model -----------------------------------------------------------------


def test_agrees_with_torchattacks_on_the_demo_model():
    from gdws_torch.experiments import demo
    from gdws_torch.io.datasets import load_dataset

    model = demo.demo_network()
    x, y = load_dataset("digits", split="test", size=16).tensors
    x, y = x[:100], y[:100]
    eps = demo.DEMO_ATTACK["eps"]
    ours = AutoAttack(
        model, eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"], steps=10,
        n_target_classes=3,
    )(x, y)  # fmt: skip
    reference = torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, eps=eps, steps=10, seed=0),
            torchattacks.APGDT(model, eps=eps, steps=10, seed=0, n_classes=4),  # 3 targets
        ]
    )(x, y)
    mine, theirs = correct(model, ours, y), correct(model, reference, y)
    assert 0.5 < float(mine.float().mean()) < 0.98  # the demo model is robust, not entirely
    assert abs(float(mine.float().mean() - theirs.float().mean())) <= 0.01
