"""Scale-out: sharding, per-sample seeded attacks, resumable results, torchrun runs.

The torchrun tests start 2 CPU processes (gloo) of the real ``gdws`` command on the
shipped demo model and compare them with 1 process; the kill tests kill a run part way
(one worker, or the only process) and resume it with the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from gdws_torch import noise_gains
from gdws_torch.robustness.attacks import PGD, PGDL1, PGDL2, sample_seed
from gdws_torch.robustness.distributed import (
    Group,
    WithIndices,
    process_group,
    shard,
    world_from_environment,
)
from gdws_torch.robustness.evaluate import batch_outcomes, evaluate_dataset
from gdws_torch.robustness.resume import ResultStore, describe_attack

CHECKPOINT = Path(__file__).parents[2] / "adapters/gdws_torch/data/digits_cnn.pth"


def small_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 16, 10),
        )
        .to(dtype)
        .eval()
    )


def small_data(n: int = 45, dtype=torch.float64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=generator, dtype=dtype)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return TensorDataset(images, labels)


# -- sharding and seeds -------------------------------------------------------------------


@given(st.integers(0, 60), st.integers(1, 7))
def test_shards_are_disjoint_and_cover_every_index(n, world):
    indices = list(range(100, 100 + n))
    shares = [shard(indices, rank, world) for rank in range(world)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == indices and len(set(flat)) == len(flat)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_shard_and_the_environment_reject_bad_ranks(monkeypatch):
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        shard([1, 2], 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2 are inconsistent"):
        world_from_environment()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK must be an integer; got 'one'"):
        world_from_environment()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_environment() == Group(1, 2, 1)


def test_a_group_of_one_makes_every_collective_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as group:
        assert (group.rank, group.world_size, group.backend, group.is_main) == (0, 1, None, True)
        tensor = torch.arange(3)
        summed = group.all_reduce_sum(tensor)
        assert torch.equal(summed, tensor) and summed is not tensor
        assert group.broadcast({"a": 1}) == {"a": 1} and group.all_gather(5) == [5]


def test_sample_seeds_differ_between_samples_restarts_and_seeds():
    seeds = {sample_seed(s, i, r) for s in (0, 1) for i in range(200) for r in range(3)}
    assert len(seeds) == 2 * 200 * 3
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert sample_seed(5, 7, 1) == sample_seed(5, 7, 1)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (PGD, {"eps": 0.1, "alpha": 0.03}),
        (PGDL2, {"eps": 0.6, "alpha": 0.2}),
        (PGDL1, {"eps": 2.0, "alpha": 0.5}),
    ],
)
def test_a_sample_is_attacked_the_same_in_any_batch(cls, kwargs):
    model = small_net()
    images, labels = small_data(12).tensors
    attack = cls(model, steps=3, n_restarts=2, seed=4, **kwargs)
    ids = torch.arange(30, 42)
    together = attack(images, labels, sample_ids=ids)
    alone = torch.cat(
        [attack(images[i : i + 1], labels[i : i + 1], sample_ids=ids[i : i + 1]) for i in range(12)]
    )
    reordered = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = attack(images[reordered], labels[reordered], sample_ids=ids[reordered])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(shuffled, together[reordered], rtol=0, atol=1e-12)
    # Another sample index is another random start.
    other = attack(images, labels, sample_ids=ids + 100)
    assert not torch.equal(other, together)


def test_sample_ids_need_one_index_per_image_and_the_seed_is_always_an_int():
    model = small_net()
    images, labels = small_data(4).tensors
    with pytest.raises(TypeError, match=r"seed must be an integer >= 0; got None"):
        PGD(model, 0.1, 0.03, seed=None)
    attack = PGD(model, 0.1, 0.03)  # seed 0 by default
    assert attack.seed == 0 and type(attack).seeds_per_sample
    assert torch.equal(
        attack(images, labels, sample_ids=[0, 1, 2, 3]),
        PGD(model, 0.1, 0.03, seed=0)(images, labels, sample_ids=[0, 1, 2, 3]),
    )
    with pytest.raises(ValueError, match="4 integer sample indices"):
        attack(images, labels, sample_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="4 integer sample indices"):
        attack(images, labels, sample_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="non-negative"):
        attack(images, labels, sample_ids=[0, -1, 2, 3])


# -- evaluate_dataset in one process --------------------------------------------------------


def reference_outcomes(model, data, attacks, n):
    """Sample by sample: the natural and attacked predictions, written out directly."""
    rows = []
    for i in range(n):
        image, label = data[i]
        x, y = image[None], torch.tensor([label])
        row = [bool(model(x).argmax(1) == y)]
        for attack in attacks.values():
            row.append(bool(model(attack(x, y, sample_ids=[i])).argmax(1) == y))
        rows.append(row)
    return torch.tensor(rows)


def test_evaluate_dataset_equals_a_sample_by_sample_reference_at_any_batch_size():
    model, data = small_net(), small_data(45)
    attacks = {
        "linf": PGD(model, 0.05, 0.02, steps=4, seed=1),
        "l2": PGDL2(model, 0.3, 0.1, steps=4, seed=2),
    }
    with torch.no_grad():
        expected = reference_outcomes(model, data, attacks, 40)
    for batch_size in (1, 7, 64):
        result = evaluate_dataset(
            model, data, attacks, n_samples=40, batch_size=batch_size, progress=False
        )
        assert result["n_samples"] == 40 and result["resumed"] == 0
        assert result["natural"] == pytest.approx(100 * expected[:, 0].float().mean().item())
        assert result["attacks"]["linf"] == pytest.approx(
            100 * expected[:, 1].float().mean().item()
        )
        assert result["attacks"]["l2"] == pytest.approx(100 * expected[:, 2].float().mean().item())
        assert result["union"] == pytest.approx(100 * expected.all(1).float().mean().item())


def test_batch_outcomes_columns_are_natural_then_each_attack():
    model, data = small_net(), small_data(9)
    images, labels = data.tensors
    attack = PGD(model, 0.05, 0.02, seed=0)
    outcomes = batch_outcomes(model, images, labels, {"a": attack}, torch.arange(9))
    assert outcomes.shape == (9, 2) and outcomes.dtype == torch.bool
    with torch.no_grad():
        natural = model(images).argmax(1) == labels
        attacked = model(attack(images, labels, sample_ids=torch.arange(9))).argmax(1) == labels
    assert torch.equal(outcomes[:, 0], natural) and torch.equal(outcomes[:, 1], attacked)


class Interrupting(nn.Module):
    """The model, but raising after ``calls`` forward passes (a crash part way)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: int | None = None

    def forward(self, x):
        if self.calls is not None:
            self.calls -= 1
            if self.calls < 0:
                raise KeyboardInterrupt
        return self.model(x)


def test_an_interrupted_evaluation_resumes_with_the_same_result(tmp_path):
    model, data = Interrupting(small_net()), small_data(45)
    attacks = {"linf": PGD(model, 0.05, 0.02, steps=3, seed=3)}
    expected = evaluate_dataset(model, data, attacks, batch_size=5, progress=False)
    folder = tmp_path / "partial"
    model.calls = 5 * (1 + 3 + 1) + 2  # five batches done, the sixth interrupted
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(
            model, data, attacks, batch_size=5, resume_dir=folder, save_every_s=0, progress=False
        )
    (part,) = folder.glob("part-*.pt")
    assert len(torch.load(part, weights_only=True)["ids"]) == 25
    assert not list(folder.glob("*.tmp"))
    model.calls = None
    resumed = evaluate_dataset(
        model, data, attacks, batch_size=5, resume_dir=folder, progress=False
    )
    assert resumed["resumed"] == 25
    assert {**resumed, "resumed": 0} == expected
    again = evaluate_dataset(model, data, attacks, batch_size=5, resume_dir=folder, progress=False)
    assert again["resumed"] == 45 and again["natural"] == expected["natural"]


def test_results_of_another_evaluation_are_refused(tmp_path):
    model, data = small_net(), small_data(20)
    folder = tmp_path / "partial"
    first = {"linf": PGD(model, 0.05, 0.02, steps=2, seed=3)}
    evaluate_dataset(model, data, first, batch_size=8, resume_dir=folder, progress=False)
    other = {"linf": PGD(model, 0.06, 0.02, steps=2, seed=3)}
    with pytest.raises(ValueError, match=r"another evaluation \(differs in: attacks\)"):
        evaluate_dataset(model, data, other, batch_size=8, resume_dir=folder, progress=False)
    with torch.no_grad():
        model[0].bias += 0.01
    with pytest.raises(ValueError, match=r"differs in: model"):
        evaluate_dataset(model, data, first, batch_size=8, resume_dir=folder, progress=False)
    with pytest.raises(ValueError, match=r"differs in: attacks, columns, model, n_samples"):
        evaluate_dataset(model, data, {}, n_samples=10, resume_dir=folder, progress=False)
    next(folder.glob("part-*.pt")).write_bytes(b"not a results file")
    with pytest.raises(ValueError, match="not a readable results file"):
        ResultStore(folder, {}).load()


def test_a_resume_accepts_the_same_attack_settings_and_refuses_any_other(tmp_path):
    model, data = small_net(), small_data(20)
    folder = tmp_path / "partial"
    first = {"linf": PGD(model, 0.05, 0.02, steps=2, seed=3)}
    evaluate_dataset(model, data, first, batch_size=8, resume_dir=folder, progress=False)
    # The manifest records each attack's settings by their names (norm, n_restarts, ...):
    # an attack built anew with the same settings resumes, one differing in any is refused.
    same = {"linf": PGD(model, 0.05, 0.02, steps=2, seed=3, norm="Linf", n_restarts=1)}
    again = evaluate_dataset(model, data, same, batch_size=8, resume_dir=folder, progress=False)
    assert again["resumed"] == 20
    for changed in ({"n_restarts": 2}, {"norm": "L2"}, {"seed": 4}, {"random_start": False}):
        other = {"linf": PGD(model, 0.05, 0.02, steps=2, **{"seed": 3, **changed})}
        with pytest.raises(ValueError, match=r"another evaluation \(differs in: attacks\)"):
            evaluate_dataset(model, data, other, batch_size=8, resume_dir=folder, progress=False)


def test_describe_attack_keeps_the_settings_not_the_model():
    model = small_net()
    described = describe_attack(PGDL1(model, 2.0, 0.5, steps=3, seed=7, sparsity=0.9))
    assert described["class"] == "gdws_torch.robustness.attacks.PGDL1"
    assert described["eps"] == 2.0 and described["seed"] == 7 and described["sparsity"] == 0.9
    assert "model" not in described


class MiscountingGroup(Group):
    """Two processes that both (wrongly) evaluated every sample."""

    def all_reduce_sum(self, tensor):
        return tensor * 2


class DisagreeingGroup(Group):
    def all_gather(self, value):
        return [value, {**value, "model": "something else"}]


def test_samples_counted_twice_or_processes_disagreeing_fail_the_run():
    model, data = small_net(), small_data(10)
    with pytest.raises(RuntimeError, match="0 samples missing and 10 counted more than once"):
        evaluate_dataset(model, data, group=MiscountingGroup(), progress=False)
    with pytest.raises(ValueError, match="process 1 evaluates a different model"):
        evaluate_dataset(model, data, group=DisagreeingGroup(), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1; got 0"),
        ({"batch_size": 2.0}, TypeError, r"batch_size must be an integer >= 1; got 2\.0 \(float\)"),
        ({"num_workers": -1}, ValueError, "num_workers must be an integer >= 0; got -1"),
        ({"save_every_s": -1}, ValueError, "save_every_s must be a finite real number >= 0"),
        ({"save_every_s": "60"}, TypeError, "save_every_s must be a finite real number >= 0"),
        (
            {"n_samples": 0},
            ValueError,
            r"n_samples \(or None: all samples\) must be an integer >= 1",
        ),
        ({"n_samples": True}, TypeError, r"n_samples \(or None: all samples\) must be an integer"),
    ],
)
def test_evaluate_dataset_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate_dataset(small_net(), small_data(5), progress=False, **kwargs)


def test_noise_gains_with_sample_ids_do_not_depend_on_chunks_or_shards():
    model, data = small_net(), small_data(24)
    attack = PGD(model, 0.05, 0.02, steps=2, seed=5)
    indexed = WithIndices(data)
    whole = noise_gains(
        model, DataLoader(indexed, batch_size=24), 24, attack=attack, chunk_size=24, progress=False
    )
    chunked = noise_gains(
        model, DataLoader(indexed, batch_size=5), 24, attack=attack, chunk_size=7, progress=False
    )
    halves = [
        noise_gains(
            model,
            DataLoader(Subset(indexed, shard(range(24), r, 2)), batch_size=4),
            12,
            attack=attack,
            chunk_size=8,
            progress=False,
        )
        for r in range(2)
    ]
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-10, atol=0)
        torch.testing.assert_close(
            (halves[0][name] + halves[1][name]) / 2, value, rtol=1e-10, atol=0
        )


# -- the gdws command under torchrun ----------------------------------------------------------

DEMO = [
    "--model", "digits_cnn", "--dataset", "digits", "--checkpoint", str(CHECKPOINT),
    "--epsilon", "24", "--pgd-alpha", "6", "--device", "cpu", "--no-progress",
]  # fmt: skip


def gdws_command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "gdws_torch.cli"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", "-m", "gdws_torch.cli",
    ]  # fmt: skip


def run_gdws(processes: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*gdws_command(processes), *args, "--threads", "1"],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def accuracies(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {k: result[k] for k in ("n_samples", "natural_accuracy", "robust_accuracy")}


@pytest.fixture(scope="module")
def single_process_eval(tmp_path_factory):
    """The reference: ``gdws eval`` on the demo model in one process, uninterrupted."""
    out = tmp_path_factory.mktemp("one") / "eval.json"
    done = run_gdws(1, "eval", *DEMO, "--attack-iters", "10", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert not out.with_suffix(".partial").exists()  # cleared once the results are written
    return accuracies(out)


def test_two_processes_give_the_same_accuracies_as_one(tmp_path, single_process_eval):
    out = tmp_path / "eval.json"
    done = run_gdws(
        2, "eval", *DEMO, "--attack-iters", "10", "--batch-size", "50", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["processes"] == 2
    assert accuracies(out) == single_process_eval
    assert single_process_eval["n_samples"] == 540
    assert done.stdout.count("natural acc.") == 1  # only rank 0 prints


def test_two_processes_give_the_same_alphas_as_one(tmp_path):
    args = ["alphas", *DEMO, "--attack-iters", "3", "--sample-size", "60", "--batch-size", "16"]
    gains = []
    for processes in (1, 2):
        out = tmp_path / f"alphas{processes}.pth"
        done = run_gdws(processes, *args, "--out", str(out))
        assert done.returncode == 0, done.stderr
        gains.append(torch.load(out, weights_only=True)["noise_gains"])
    assert gains[0].keys() == gains[1].keys()
    for name, value in gains[0].items():
        torch.testing.assert_close(gains[1][name], value, rtol=1e-4, atol=0)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _saved_samples(folder: Path) -> int:
    total = 0
    for part in folder.glob("part-*.pt"):
        try:
            total += len(torch.load(part, weights_only=True)["ids"])
        except Exception:  # replaced while reading
            pass
    return total


def kill_part_way(processes: int, args: list[str], folder: Path, at_least: int) -> tuple[int, str]:
    """Start the command, wait until ``at_least`` samples are saved, SIGKILL a process.

    Returns the command's exit status and standard error.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        [*gdws_command(processes), *args, "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while _saved_samples(folder) < at_least:
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if processes == 1:
        run.send_signal(signal.SIGKILL)
    else:
        workers = _children(run.pid)
        assert workers, "no worker processes found"
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies; the others must not finish
    _, stderr = run.communicate(timeout=300)
    return run.returncode, stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, processes, single_process_eval):
    out = tmp_path / "eval.json"
    args = ["eval", *DEMO, "--attack-iters", "10", "--batch-size", "10", "--save-every", "0",
            "--json", str(out)]  # fmt: skip
    folder = out.with_suffix(".partial")
    status, stderr = kill_part_way(processes, args, folder, at_least=60)
    assert status != 0
    assert not out.exists(), "a killed run must not report a result"
    if processes > 1:  # torchrun stops the other process and names the one that failed
        assert "Root Cause" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr
    saved = _saved_samples(folder)
    assert 60 <= saved < 540
    done = run_gdws(processes, *args)
    assert done.returncode == 0, done.stderr
    assert "resumed:" in done.stdout
    resumed = int(done.stdout.split("resumed:")[1].split()[0])
    assert resumed >= saved  # saved parts are only ever replaced by longer ones
    assert accuracies(out) == single_process_eval
    assert not folder.exists()


def test_a_results_folder_of_another_run_is_refused_in_one_line(tmp_path):
    out = tmp_path / "eval.json"
    base = ["eval", *DEMO, "--attack-iters", "1", "--n-samples", "20", "--json", str(out)]
    folder = tmp_path / "kept"
    ResultStore(folder, {"format": 0}).save("x", 0, torch.tensor([0]), torch.tensor([[True]]))
    done = run_gdws(1, *base, "--resume-dir", str(folder))
    assert done.returncode == 2
    assert "holds the results of another evaluation" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    done = run_gdws(1, *base, "--resume-dir", str(folder), "--fresh")
    assert done.returncode == 0, done.stderr
