"""Evaluation scaling: ``gdws eval`` with 1 process and with N under torchrun, same work.

The shipped demo model (DigitsCNN) on the 540 test digits (``--n-samples``), Linf
PGD-``--steps`` at 24/255, per-sample seeded: every run must give the same accuracies
(checked). The sides share the machine's cores: 1 process with all ``--threads``, N
processes with ``threads / N`` each, and, for reference, 1 process with ``threads / N``
(how much of the gain intra-op threading would give). They run as subprocesses,
interleaved and repeated ``--repeats`` times; the figures are medians of the evaluation
time each run reports (its slowest process; start-up, model loading and the rendezvous
are excluded, and quoted separately as whole-command wall time).

Second part, in this process: the overhead of the distributed code path when run
alone, ``evaluate_dataset`` (per-sample seeds, sharding bookkeeping, the results
saved with the command's default period and once at the end) against the plain
``evaluate`` loop on the same model, data and attack, interleaved (target < 5 %).

Run: ``python bench/eval_scaling.py [--processes N] [--repeats R] [--steps S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from gdws_approx.files import write_json_atomic
from gdws_torch.experiments.demo import demo_network
from gdws_torch.io.datasets import load_dataset
from gdws_torch.robustness.attacks import PGD
from gdws_torch.robustness.evaluate import evaluate, evaluate_dataset

CHECKPOINT = Path(__file__).parents[1] / "adapters/gdws_torch/data/digits_cnn.pth"


def eval_command(processes: int, threads: int, steps: int, n: int, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "gdws_torch.cli"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "gdws_torch.cli",
        ]  # fmt: skip
    return [
        *launcher, "eval", "--model", "digits_cnn", "--dataset", "digits",
        "--checkpoint", str(CHECKPOINT), "--epsilon", "24", "--pgd-alpha", "6",
        "--attack-iters", str(steps), "--device", "cpu", "--no-progress",
        "--threads", str(threads), "--json", str(out), "--overwrite", "--fresh",
        "--n-samples", str(n),
    ]  # fmt: skip


def run_eval(processes: int, threads: int, steps: int, n: int, folder: Path) -> dict:
    out = folder / f"eval-{processes}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        eval_command(processes, threads, steps, n, out), capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"gdws eval with {processes} processes failed:\n{done.stderr}")
    result = json.loads(out.read_text())
    return {
        "seconds": result["evaluation_seconds"],
        "wall_seconds": wall,
        "accuracies": (result["natural_accuracy"], result["robust_accuracy"]),
        "n_samples": result["n_samples"],
    }


def overhead(steps: int, n: int, repeats: int, threads: int) -> dict:
    """Plain ``evaluate`` vs ``evaluate_dataset`` in this process, interleaved."""
    torch.set_num_threads(threads)
    model = demo_network()  # takes raw pixels, as `gdws eval --dataset digits` feeds it
    data = Subset(load_dataset("digits", None, "test", size=16), range(n))
    attack = PGD(model, 24 / 255, 6 / 255, steps=steps, seed=0)
    times: dict[str, list[float]] = {"evaluate": [], "evaluate_dataset": []}
    with tempfile.TemporaryDirectory() as folder:

        def plain() -> dict:
            return evaluate(
                model, DataLoader(data, batch_size=128), {"pgd": attack}, progress=False
            )

        def distributed_path() -> dict:
            return evaluate_dataset(
                model, data, {"pgd": attack}, batch_size=128, progress=False,
                resume_dir=Path(folder) / "partial", save_every_s=60.0,
            )  # fmt: skip

        sides = [("evaluate", plain), ("evaluate_dataset", distributed_path)]
        for repeat in range(repeats):
            for side, fn in sides if repeat % 2 == 0 else sides[::-1]:
                for part in (Path(folder) / "partial").glob("*"):
                    part.unlink()  # every run evaluates everything
                start = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - start)
    median = {side: statistics.median(t) for side, t in times.items()}
    return {
        "seconds": times,
        "median_seconds": median,
        "overhead": median["evaluate_dataset"] / median["evaluate"] - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-samples", type=int, default=540, help="test digits (at most 540)")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/eval_scaling.json"))
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps, args.threads) < 1 or args.processes < 2:
        print("error: --processes >= 2; --repeats, --steps, --threads >= 1", file=sys.stderr)
        return 2
    if not 1 <= args.n_samples <= 540:
        print("error: --n-samples must be in 1..540", file=sys.stderr)
        return 2
    per_process = max(1, args.threads // args.processes)
    print(
        f"demo model, {args.n_samples} test digits, Linf PGD-{args.steps}; {os.cpu_count()} CPUs; "
        f"1 process x {args.threads} threads vs {args.processes} processes x "
        f"{per_process} threads (gloo)"
    )
    sides = [(1, args.threads), (args.processes, per_process)]
    if per_process != args.threads:
        sides.append((1, per_process))
    runs: dict[tuple[int, int], list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for processes, threads in sides if repeat % 2 == 0 else sides[::-1]:
                run = run_eval(processes, threads, args.steps, args.n_samples, Path(folder))
                runs[processes, threads].append(run)
    answers = {run["accuracies"] for side in runs.values() for run in side}
    if len(answers) != 1:
        print(f"error: the runs disagree: {sorted(answers)}", file=sys.stderr)
        return 1
    n = runs[sides[0]][0]["n_samples"]
    summary = {}
    for (processes, threads), side in runs.items():
        seconds = statistics.median(run["seconds"] for run in side)
        wall = statistics.median(run["wall_seconds"] for run in side)
        label = f"{processes}x{threads}"
        summary[label] = {"seconds": seconds, "samples_per_s": n / seconds, "wall": wall}
        print(
            f"{processes} process{'es' if processes > 1 else '  '} x {threads} thread"
            f"{'s' if threads > 1 else ' '}: {n / seconds:7.1f} samples/s (evaluation "
            f"{seconds:.2f} s, whole command {wall:.2f} s; median of {args.repeats})"
        )
    many, one = f"{args.processes}x{per_process}", f"1x{args.threads}"
    ratio = summary[many]["samples_per_s"] / summary[one]["samples_per_s"]
    natural, robust = answers.pop()
    print(f"every run: natural {natural:.2f} %, robust {robust:.2f} % (identical)")
    cost = overhead(args.steps, args.n_samples, 2 * args.repeats + 1, args.threads)
    print(
        f"single-process overhead of the distributed path: {100 * cost['overhead']:+.1f} % "
        f"(evaluate_dataset {cost['median_seconds']['evaluate_dataset']:.3f} s vs evaluate "
        f"{cost['median_seconds']['evaluate']:.3f} s; target < 5 %)"
    )
    write_json_atomic(
        args.out,
        {
            "model": f"DigitsCNN (demo), {args.n_samples} test digits",
            "attack": f"Linf PGD-{args.steps}, eps 24/255",
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "runs": {f"{p}x{t}": v for (p, t), v in runs.items()},
            "summary": summary,
            "speedup": ratio,
            "single_process_overhead": cost,
        },
    )
    print(f"JSON: {args.out}")
    print(
        f"RESULT eval_scaling: {ratio:.2f}x ({args.processes} processes x {per_process} "
        f"threads vs 1 process x {args.threads} threads, evaluation throughput)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
