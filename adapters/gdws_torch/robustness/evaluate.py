"""Natural, per-attack and union robust accuracy of a classifier over a loader."""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from gdws_approx.checks import check_integer, check_real
from gdws_torch.common import checked_batches
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.robustness.checks import check_input_dtype, check_labels
from gdws_torch.robustness.distributed import Group, shard
from gdws_torch.robustness.resume import ResultStore, dataset_digest, describe_attack, model_digest

__all__ = ["batch_outcomes", "evaluate", "evaluate_dataset"]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    attacks: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    *,
    n_samples: int | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy on natural inputs, under each attack, and under their union.

    A sample counts for the union only if it is classified correctly on its natural
    input *and* under every attack of the set (the paper's union of Linf, L2, L1).

    Parameters
    ----------
    model : torch.nn.Module
        Takes pixels in ``[0, 1]`` and returns logits. Evaluated in eval mode; its
        mode is restored afterwards.
    loader : iterable of (images, labels)
    attacks : mapping of str to callable, optional
        ``{name: attack(images, labels) -> images}``, e.g. ``{"Linf": PGD(model, ...)}``.
    n_samples : int, optional
        Stop after this many samples (all of the loader by default).
    device : optional
        Where to run (default: the model's parameters' device).
    progress : bool, default=True

    Returns
    -------
    dict
        ``{"n_samples": N, "natural": %, "attacks": {name: %}, "union": % or None}``,
        accuracies in percent. With an ensemble among the attacks (one with
        ``stage_names`` and a ``last_report``, as
        :class:`~gdws_torch.robustness.autoattack.AutoAttack`), also ``"by_attack"``:
        ``{name: {stage: %}}``, the robust accuracy after each of its attacks and the
        earlier ones (the last equals ``attacks[name]``).
    """
    attacks = _check_arguments(attacks, n_samples)
    if device is None:
        device = next(iter(model.parameters())).device
    seen = 0
    columns, main = _columns(attacks)
    counts = torch.zeros(len(columns), dtype=torch.long)
    union = torch.zeros((), dtype=torch.long)
    bar = tqdm(total=n_samples, desc="evaluate", unit="sample", disable=not progress)
    try:
        with eval_mode(model):
            batches = checked_batches(loader, "evaluation", n_samples=n_samples, labels=True)
            for images, labels, *_ in batches:
                outcomes = batch_outcomes(model, images.to(device), labels.to(device), attacks)
                counts += outcomes.sum(0)
                union += outcomes[:, main].all(1).sum()
                seen += len(labels)
                bar.update(len(labels))
    finally:
        bar.close()
    if seen == 0:
        raise ValueError("the loader yielded no samples.")

    return _summary(seen, counts, union, attacks)


def _columns(attacks: Mapping[str, Callable]) -> tuple[list[str], list[int]]:
    """The outcome columns (natural, then each attack followed by its ensemble's stages,
    ``"name | stage"``) and the indices of the natural and attack columns."""
    columns, main = ["natural"], [0]
    for name, attack in attacks.items():
        main.append(len(columns))
        columns.append(name)
        columns += [f"{name} | {stage}" for stage in _stages(attack)]
    return columns, main


def _stages(attack: Callable) -> tuple[str, ...]:
    stages = getattr(attack, "stage_names", None)
    return tuple(stages) if stages and hasattr(attack, "last_report") else ()


def _check_arguments(attacks: Mapping | None, n_samples: Any) -> dict[str, Callable]:
    attacks = dict(attacks or {})
    for name, attack in attacks.items():
        if not callable(attack):
            raise TypeError(f"attacks[{name!r}] must be callable; got {type(attack).__name__}.")
    if n_samples is not None:
        check_integer(n_samples, "n_samples (or None: all samples)", minimum=1)
    return attacks


def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    attacks: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    *,
    n_samples: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: Any = None,
    resume_dir: str | os.PathLike | None = None,
    resume_description: Mapping[str, Any] | None = None,
    save_every_s: float = 60.0,
    group: Group | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate` on the first ``n_samples`` of a dataset: sharded, resumable, seeded.

    - **Sharded**: with a :class:`~gdws_torch.robustness.distributed.Group` of several processes
      (``torchrun``), each evaluates every ``world_size``-th remaining sample; the
      per-sample outcomes are summed over processes, and the run fails unless every
      sample was evaluated exactly once.
    - **Seeded per sample**: attacks that take ``sample_ids`` (the library's, with a
      seed) start each sample from its own random point, so 1 and N processes, and any
      batch size, give the same result (up to floating-point differences between
      batch sizes).
    - **Resumable**: with ``resume_dir``, each process saves its per-sample outcomes
      there at most every ``save_every_s`` seconds and when it finishes; a later call
      with the same model weights, data, attacks (and their seeds) and ``n_samples``
      evaluates only what is missing. Anything else is refused, never mixed.

    Parameters
    ----------
    model : torch.nn.Module
        Pixels in ``[0, 1]`` to logits; evaluated in eval mode, its mode restored.
    dataset : torch.utils.data.Dataset
        Indexable, yielding ``(image, label)``.
    attacks : mapping of str to callable, optional
        As :func:`evaluate`.
    n_samples : int, optional
        Evaluate samples ``0 .. n_samples - 1`` (default: all).
    batch_size, num_workers : int
        Of each process's ``DataLoader``.
    device : optional
        Default: the model's parameters' device.
    resume_dir : path-like, optional
        Folder of saved per-sample results (see :mod:`gdws_torch.robustness.resume`): new, empty,
        or written by an earlier call; it is left in place (remove it with
        :meth:`gdws_torch.robustness.resume.ResultStore.clear` once the results are kept).
    resume_description : mapping, optional
        Plain values naming the run (command, files), stored in the folder's manifest.
    save_every_s : float, default=60
        Least time between two saves of a process's results (0: after every batch).
    group : Group, optional
        The processes sharing the work (default: this process alone; see
        :func:`gdws_torch.robustness.distributed.process_group`).
    progress : bool, default=True
        A progress bar on rank 0.

    Returns
    -------
    dict
        As :func:`evaluate`, plus ``"resumed"`` (samples taken from ``resume_dir``) and
        ``"world_size"``. Every process returns the same dict.

    Raises
    ------
    ValueError
        Bad arguments; a ``resume_dir`` holding another evaluation's results, a damaged
        part or files the project did not write; processes evaluating different models,
        data or attacks.
    TypeError
        An argument of the wrong type (``n_samples``, ``batch_size`` or ``num_workers``
        not an integer, ``save_every_s`` not a real number, an attack not callable).
    RuntimeError
        Samples missing or counted twice after the processes' results are combined.
    """
    attacks = _check_arguments(attacks, n_samples)
    check_integer(batch_size, "batch_size", minimum=1)
    check_integer(num_workers, "num_workers", minimum=0)
    if save_every_s != math.inf:  # inf: save only when the evaluation finishes
        check_real(save_every_s, "save_every_s", minimum=0)
    group = group or Group()
    total = len(dataset) if n_samples is None else min(int(n_samples), len(dataset))
    if total == 0:
        raise ValueError("the dataset has no samples.")
    if device is None:
        device = next(iter(model.parameters())).device
    columns, main = _columns(attacks)
    fingerprint = {
        "format": 1,
        "n_samples": total,
        "columns": columns,
        "attacks": [describe_attack(attack) for attack in attacks.values()],
        "model": model_digest(model),
    }
    if resume_dir is not None:
        fingerprint["data"] = dataset_digest(dataset)
    for rank, theirs in enumerate(group.all_gather(fingerprint)):
        if theirs != fingerprint:
            raise ValueError(
                f"process {rank} evaluates a different model, data or attacks than process "
                f"{group.rank}; every process must build the same ones."
            )
    per_sample = all(getattr(a, "seeds_per_sample", False) for a in attacks.values())
    if not (group.world_size == 1 or per_sample):
        warnings.warn(
            "an attack without per-sample seeds (sample_ids): results depend on how the "
            "samples are split over processes and batches.",
            stacklevel=2,
        )
    store = None
    if resume_dir is not None:
        store = ResultStore(resume_dir, fingerprint, resume_description)
    done_ids, done_outcomes = (None, None)
    if group.is_main and store is not None:
        store.open()
        done_ids, done_outcomes = store.load()
    # Rank 0 decides what is left, so every process shards the same list, and names the run.
    done, run = group.broadcast(
        ([] if done_ids is None else done_ids.tolist(), uuid.uuid4().hex[:12])
    )
    done_set = set(done)
    remaining = [i for i in range(total) if i not in done_set]
    mine = shard(remaining, group.rank, group.world_size)
    ids, outcomes = _evaluate_indices(
        model,
        dataset,
        mine,
        attacks,
        loading={"batch_size": batch_size, "num_workers": num_workers},
        device=device,
        saving=(store, run, save_every_s),
        group=group,
        progress=progress,
    )
    # Every sample's row once: the saved ones from rank 0, the new ones from their rank.
    table = torch.zeros(total, 1 + len(columns), dtype=torch.int32)
    if done_outcomes is not None and len(done_outcomes):
        table[done_ids, 0] += 1
        table[done_ids, 1:] += done_outcomes.to(torch.int32)
    if len(ids):
        table[ids, 0] += 1
        table[ids, 1:] += outcomes.to(torch.int32)
    table = group.all_reduce_sum(table)
    times = table[:, 0]
    if not bool((times == 1).all()):
        missing = int((times == 0).sum())
        twice = int((times > 1).sum())
        raise RuntimeError(
            f"combining the processes' results: {missing} samples missing and {twice} "
            "counted more than once; the run is incomplete and reports nothing."
        )
    correct = table[:, 1:].to(torch.bool)
    result = _summary(total, correct.sum(0), correct[:, main].all(1).sum(), attacks)
    return {**result, "resumed": len(done), "world_size": group.world_size}


def _evaluate_indices(
    model: nn.Module,
    dataset: Dataset,
    indices: list[int],
    attacks: dict[str, Callable],
    *,
    loading: dict[str, int],
    device: Any,
    saving: tuple[ResultStore | None, str, float],
    group: Group,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's per-sample outcomes on ``indices``, saved as it goes.

    ``saving`` is ``(store or None, run id, least seconds between saves)``.
    """
    store, run, save_every_s = saving
    ids = torch.zeros(0, dtype=torch.long)
    outcomes = torch.zeros(0, len(_columns(attacks)[0]), dtype=torch.bool)
    if not indices:
        if store is not None:
            store.save(run, group.rank, ids, outcomes)
        return ids, outcomes
    loader = DataLoader(Subset(dataset, indices), **loading)
    order = torch.tensor(indices, dtype=torch.long)
    where = f" (process {group.rank} of {group.world_size})" if group.world_size > 1 else ""
    bar = tqdm(
        total=len(indices),
        desc=f"evaluate{where}",
        unit="sample",
        disable=not (progress and group.is_main),
    )
    done_ids, done_outcomes = [], []
    position = 0
    last_save = time.monotonic()
    try:
        with eval_mode(model):
            for images, labels, *_ in checked_batches(loader, "evaluation", labels=True):
                batch_ids = order[position : position + len(labels)]
                position += len(labels)
                batch = batch_outcomes(
                    model, images.to(device), labels.to(device), attacks, batch_ids
                )
                done_ids.append(batch_ids)
                done_outcomes.append(batch)
                bar.update(len(labels))
                if store is not None and time.monotonic() - last_save >= save_every_s:
                    store.save(run, group.rank, torch.cat(done_ids), torch.cat(done_outcomes))
                    last_save = time.monotonic()
    finally:
        bar.close()
    ids, outcomes = torch.cat(done_ids), torch.cat(done_outcomes)
    if store is not None:
        store.save(run, group.rank, ids, outcomes)
    return ids, outcomes


def _summary(seen: int, counts: torch.Tensor, union: torch.Tensor, attacks: Mapping) -> dict:
    """The result dict from per-column counts (the layout of :func:`_columns`)."""

    def percent(count: torch.Tensor) -> float:
        return 100.0 * int(count) / seen

    columns, main = _columns(attacks)
    result = {
        "n_samples": seen,
        "natural": percent(counts[0]),
        "attacks": {columns[i]: percent(counts[i]) for i in main[1:]},
        "union": percent(union) if attacks else None,
    }
    staged = {name: _stages(attack) for name, attack in attacks.items() if _stages(attack)}
    if staged:
        index = {name: i for i, name in enumerate(columns)}
        result["by_attack"] = {
            name: {stage: percent(counts[index[f"{name} | {stage}"]]) for stage in stages}
            for name, stages in staged.items()
        }
    return result


def batch_outcomes(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Mapping[str, Callable],
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sample, whether it is classified correctly naturally and under each attack.

    Returns a bool tensor on the CPU: column 0 natural, then one column per attack; an
    ensemble's column (:class:`~gdws_torch.robustness.autoattack.AutoAttack`) is followed
    by one per attack of it: correct after that attack and every earlier one (from its
    ``last_report``). Without ensembles that is ``(N, 1 + len(attacks))``. ``sample_ids``
    goes to the attacks that seed each sample on its own (``seeds_per_sample``).
    Labels must be class indices in ``[0, number of logits)`` (a ``ValueError`` otherwise).
    """
    check_input_dtype(model, images)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    check_labels(labels, logits.shape[-1])
    columns = [logits.argmax(1) == labels]
    for attack in attacks.values():
        if sample_ids is not None and getattr(attack, "seeds_per_sample", False):
            adversarial = attack(images, labels, sample_ids=sample_ids)
        else:
            adversarial = attack(images, labels)
        model.eval()
        with torch.no_grad():
            columns.append(model(adversarial).argmax(1) == labels)
        stages = _stages(attack)
        if stages:
            broken_by = attack.last_report.broken_by.to(labels.device)
            columns += [broken_by > i for i in range(len(stages))]
    return torch.stack(columns, 1).cpu()
