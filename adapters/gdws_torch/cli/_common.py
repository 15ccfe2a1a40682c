"""What the ``gdws`` subcommands share: arguments, model and data set-up, output files.

Over 400 lines: the argument groups, checks and set-up that several subcommands use, and
the command line's conversion: the flags as a :class:`~gdws_torch.Recipe`
(:func:`cli_recipe`), run by :func:`gdws_torch.compress` (:func:`approximate`). Each
subcommand's module only parses, calls these and the library, and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gdws_torch.cli._errors import UsageError
from gdws_torch.cli._outputs import Outputs
from gdws_torch.cli._speed import check_speed_flags, say_accepted_miss, speed_target_missed
from gdws_torch.conversion.options import (
    BatchNormStatistics,
    ErrorWeights,
    Latency,
    Recovery,
    Refit,
    Weighting,
)
from gdws_torch.conversion.pipeline import compress
from gdws_torch.conversion.recipes import RECIPES, Recipe, get_recipe
from gdws_torch.conversion.speed_target import SpeedTargetMissed
from gdws_torch.cost.throughput import BACKENDS
from gdws_torch.io.checkpoints import load_channel_weights
from gdws_torch.io.datasets import DATASETS, load_dataset, num_classes
from gdws_torch.io.original_checkpoints import (
    CHECKPOINT_FORMATS,
    LoadedCheckpoint,
    find_checkpoint,
    load_checked_state,
    read_checkpoint,
)
from gdws_torch.models import ARCHITECTURES
from gdws_torch.nn.normalization import normalized
from gdws_torch.recovery import batchnorm_layers
from gdws_torch.robustness.apgd import APGD
from gdws_torch.robustness.attacks import PGD, Attack
from gdws_torch.robustness.autoattack import AutoAttack
from gdws_torch.robustness.checks import NORMS
from gdws_torch.robustness.distributed import process_group, world_from_environment

# The original's model names (its get_architecture) not registered as they are, and
# other spellings users type.
MODEL_ALIASES = {
    "wrn28_4": "wrn_28_4",
    "vgg16_hydra": "vgg16_bn",
    "digits": "digits_cnn",
}
DIGITS_SIZE = 16  # the demo network's input side
#: The original work's spellings of --norm, still accepted: everything the CLI writes says
#: Linf, L2, L1 (the library's).
ORIGINAL_NORMS = {"l_inf": "Linf", "l_2": "L2", "l_1": "L1"}
NORM_HELP = f"Linf, L2 or L1 (the original's {', '.join(ORIGINAL_NORMS)} are accepted)"


def norm_flag(value: str) -> str:
    """``--norm``'s type: the library's spelling of ``value`` (see :data:`ORIGINAL_NORMS`)."""
    return ORIGINAL_NORMS.get(value, value)


# --attack of the evaluating commands (eval, sweep, demo); the others craft PGD inputs.
EVALUATION_ATTACKS = ("pgd", "apgd", "autoattack", "autoattack-fast", "none")
ATTACK_HELP = (
    "pgd: the original's PGD (--attack-iters, --pgd-alpha, --restarts); apgd: APGD-CE "
    "(--attack-iters, default 100; --restarts); autoattack: the standard AutoAttack "
    "(APGD-CE, APGD-T, FAB-T, Square; docs/attacks.md); autoattack-fast: APGD-CE + APGD-T"
)
MASKING_SAMPLES = 100  # test inputs the gradient-masking checks run on


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``gdws eval: error: ...``) and exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


# -- arguments ----------------------------------------------------------------------------


def add_model_arguments(
    parser: argparse.ArgumentParser, checkpoint: bool = True, device: bool = True
) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", required=True, help=f"architecture: {model_names()}")
    group.add_argument("--dataset", default="cifar10", choices=DATASETS)
    group.add_argument(
        "--data-dir",
        "--root",
        dest="data_dir",
        help="folder holding the dataset's files (cifar-10-batches-py/, ...); not for digits",
    )
    group.add_argument(
        "--fname",
        help="run folder: holds model_best.pth (or, by --checkpoint-format, the original's "
        "other checkpoint files); other file names are relative to it",
    )
    if checkpoint:
        group.add_argument("--checkpoint", help="checkpoint file (default: FNAME/model_best.pth)")
        add_checkpoint_format_argument(group)
    group.add_argument(
        "--no-norm",
        action="store_true",
        help="the checkpoint expects raw pixels (no dataset normalisation in front of it)",
    )
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    if device:
        group.add_argument(
            "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
        )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_names() -> str:
    """The ``--model`` names, and the aliases, for the help."""
    aliases = ", ".join(f"{alias} = {name}" for alias, name in MODEL_ALIASES.items())
    return f"{', '.join(sorted(ARCHITECTURES))} (aliases: {aliases})"


def add_checkpoint_format_argument(group) -> None:
    """``--checkpoint-format``: the layout of the original's checkpoint files."""
    group.add_argument(
        "--checkpoint-format",
        default="auto",
        choices=CHECKPOINT_FORMATS,
        help="the checkpoint's layout: original (FNAME/model_best.pth), hydra "
        "(model_best_dense.pth), admm (pretrained.pt or retrained_bn.pt, 'basic_model.' "
        "names), msd (MSD_V0.pt, a bare state dict), robnet (RobNet_free_cifar10.pth.tar, "
        "loaded non-strictly); auto (default): by the file's name and keys, and the "
        "original's run-folder names (hydra, admm, msd, nas in the --fname folder's name)",
    )


def add_attack_arguments(
    parser: argparse.ArgumentParser,
    default_attack: str = "pgd",
    union: bool = False,
    evaluation: bool = False,
) -> None:
    """The attack flags; ``evaluation``: the robust-accuracy attacks too (APGD, AutoAttack),
    else PGD only (the commands crafting training or calibration inputs)."""
    group = parser.add_argument_group("attack (the original's flags; sizes in 1/255 units)")
    several = {"nargs": "+"} if union else {}
    if evaluation:
        group.add_argument(
            "--attack", default=default_attack, choices=EVALUATION_ATTACKS, help=ATTACK_HELP
        )
    else:
        group.add_argument("--attack", default=default_attack, choices=("pgd", "none"))
    group.add_argument(
        "--norm",
        default=["Linf"] if union else "Linf",
        type=norm_flag,
        choices=NORMS,
        help=NORM_HELP + ("; several: robust accuracy under each and their union" if union else ""),
        **several,
    )
    each = " (one value, or one per --norm)" if union else ""
    group.add_argument(
        "--epsilon",
        type=float,
        default=[8.0] if union else 8.0,
        help=f"radius, in 1/255 (default 8){each}",
        **several,
    )
    group.add_argument(
        "--pgd-alpha",
        type=float,
        default=[2.0] if union else 2.0,
        help=f"step, in 1/255 (default 2){each}",
        **several,
    )
    if evaluation:
        group.add_argument(
            "--attack-iters",
            type=int,
            help="PGD iterations (default 10; also of the recovery's PGD inputs), or APGD's "
            "with --attack apgd (default 100); AutoAttack's are fixed",
        )
    else:
        group.add_argument("--attack-iters", type=int, default=10)
    group.add_argument("--restarts", type=int, default=1)
    group.add_argument(
        "--l1-sparsity", type=float, default=0.99, help="L1 only: quantile of |grad| not moved"
    )


def add_budget_arguments(
    group, required: bool = False, target_help: str = "", speedup: bool = False
) -> None:
    """The mutually exclusive ``--beta | --target-mac-reduction | --n-kernels`` (and
    ``--target-speedup`` with ``speedup``)."""
    budget = group.add_mutually_exclusive_group(required=required)
    budget.add_argument("--beta", type=float, help="LEGO error budget of every layer")
    budget.add_argument(
        "--target-mac-reduction",
        type=float,
        help=target_help or "overall conv MAC reduction to reach (see --allocation)",
    )
    budget.add_argument("--n-kernels", type=int, help="MEGO: depthwise kernels per layer")
    if speedup:
        budget.add_argument(
            "--target-speedup",
            type=float,
            help="measured speed-up to reach on --backend at --latency-batch-size: layers "
            "planned from latency tables, the result timed (docs/fps.md)",
        )


def add_latency_arguments(group, users: str = "--target-speedup") -> None:
    """``--backend``, ``--latency-batch-size`` and ``--latency-table``: where and how
    ``users`` time layers and models."""
    group.add_argument(
        "--backend",
        default="eager",
        choices=BACKENDS,
        help=f"where the layers and models are timed for {users} (default eager)",
    )
    group.add_argument(
        "--latency-batch-size",
        type=int,
        default=1,
        metavar="N",
        help=f"batch size they are timed at for {users}",
    )
    group.add_argument(
        "--latency-table",
        metavar="JSON",
        help="latency table of --target-speedup, read (refused when its checksum or the "
        "conditions it was timed in do not match) and extended (default: the user cache, "
        "$GDWS_CACHE_DIR or ~/.cache/gdws-approx/latency-tables.json)",
    )
    group.add_argument(
        "--allow-miss",
        action="store_true",
        help="keep the closest model when the measured speed-up misses --target-speedup "
        "(without it a miss ends the command with exit code 1)",
    )


def add_gdws_arguments(parser: argparse.ArgumentParser, recalibration: bool = True) -> None:
    group = parser.add_argument_group("GDWS approximation")
    add_budget_arguments(group, speedup=True)
    group.add_argument(
        "--alphas-filename",
        "--alphas",
        dest="alphas",
        help="channel weights file: the original's alphas (noise gains) format, relative to "
        "FNAME; unit weights if absent",
    )
    group.add_argument(
        "--replace-all",
        action="store_true",
        help="replace every eligible layer, even where GDWS needs more MACs (the original)",
    )
    group.add_argument(
        "--include-first",
        action="store_true",
        help="also approximate the network's first convolution",
    )
    group.add_argument(
        "--latency-aware",
        action="store_true",
        help="time each layer dense vs GDWS on --backend; keep dense where GDWS is not faster",
    )
    add_latency_arguments(group, "--target-speedup and --latency-aware")
    group.add_argument(
        "--allocation",
        choices=("common_beta", "global"),
        default="common_beta",
        help="with --target-mac-reduction: one LEGO beta for all layers (the original), or "
        "the least total error for the MACs",
    )
    if not recalibration:
        parser.set_defaults(
            recipe=None,
            recalibrate_bn=0,
            recalibrate_attack=False,
            weighting="unit",
            refit=0,
            refit_attack=False,
            refit_depthwise=True,
            refit_iterations=3,
        )
        return
    group.add_argument(
        "--recipe",
        choices=("robust", "original", "unit"),
        help="run a named recipe end to end (docs/recipes.md): robust = data weighting, "
        "global allocation, joint refit on 1000 PGD training inputs (the attack flags), "
        "BatchNorm re-estimated on 1000; original = LEGO with noise gains; unit = LEGO, no "
        "data. gdws convert runs robust by default when it finds the training data",
    )
    group.add_argument(
        "--weighting",
        choices=("unit", "output", "data", "output+data"),
        default="unit",
        help="error weighting (docs/weightings.md); data-driven ones use 256 training inputs",
    )
    group.add_argument(
        "--recalibrate-bn",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training inputs after converting (0: off)",
    )
    group.add_argument(
        "--recalibrate-attack",
        action="store_true",
        help="also recalibrate on PGD inputs (the attack flags) of the converted model",
    )
    group.add_argument(
        "--refit",
        type=int,
        default=0,
        metavar="N",
        help="re-solve the depthwise kernels and pointwise weights (the joint refit) to match "
        "the dense convs on N training inputs (0: off); before --recalibrate-bn",
    )
    group.add_argument(
        "--refit-attack",
        action="store_true",
        help="refit on PGD inputs (the attack flags) crafted against the dense model",
    )
    group.add_argument(
        "--refit-depthwise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --refit: re-solve the depthwise kernels too, by alternating least squares "
        "(same MACs; the default); --no-refit-depthwise: the pointwise weights only",
    )
    group.add_argument(
        "--refit-iterations",
        type=int,
        default=3,
        metavar="K",
        help="alternations of the joint refit (default 3)",
    )


# -- checks -------------------------------------------------------------------------------


def check_common(args: argparse.Namespace) -> None:
    """Range checks argparse's types cannot express."""
    for name in ("batch_size", "attack_iters", "restarts", "threads", "n_samples", "sample_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive; got {value}.")
    for name in ("epsilon", "pgd_alpha"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not (math.isfinite(value) and value > 0):
                flag = f"--{name.replace('_', '-')}"
                raise UsageError(f"{flag} must be a positive number; got {value}.")
    if getattr(args, "attack", "none") != "none" and hasattr(args, "norm"):
        attack_specs(args)  # norms and sizes agree, before any long work (not demo's)
    if hasattr(args, "workers"):
        if args.workers is None:  # image files are decoded on the fly; the rest is in memory
            args.workers = min(4, os.cpu_count() or 1) if args.dataset == "imagenet" else 0
        if args.workers < 0:
            raise UsageError(f"--workers must be >= 0; got {args.workers}.")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def device(args: argparse.Namespace) -> torch.device:
    """``--device``, with ``auto`` meaning CUDA when there is one.

    Under ``torchrun``, ``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``.
    """
    name = getattr(args, "device", "auto")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", world_from_environment().local_rank)
    if name == "auto":
        return torch.device("cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}.") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here.")
    if chosen.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}.")
    return chosen


def check_gdws_flags(args: argparse.Namespace) -> None:
    """GDWS options given to ``eval`` without ``--apply-gdws`` would be silently ignored."""
    given = [
        flag
        for flag, value in (
            ("--beta", args.beta),
            ("--target-mac-reduction", args.target_mac_reduction),
            ("--target-speedup", args.target_speedup),
            ("--n-kernels", args.n_kernels),
            ("--alphas-filename", args.alphas),
            ("--weighting", None if args.weighting == "unit" else args.weighting),
            ("--allocation", None if args.allocation == "common_beta" else args.allocation),
            ("--latency-aware", args.latency_aware or None),
            ("--latency-table", args.latency_table),
            ("--allow-miss", args.allow_miss or None),
        )
        if value is not None
    ]
    if given and not args.apply_gdws:
        raise UsageError(f"{', '.join(given)} only apply with --apply-gdws.")
    recovery = args.recalibrate_bn or args.recalibrate_attack or args.refit or args.refit_attack
    if recovery and not (args.apply_gdws or args.converted):
        raise UsageError("--recalibrate-bn applies to a GDWS model: add --apply-gdws.")


def in_run_folder(args: argparse.Namespace, name: str | None) -> Path | None:
    """``name`` inside ``--fname`` unless it is absolute or there is no run folder."""
    if name is None:
        return None
    path = Path(name)
    if path.is_absolute() or args.fname is None:
        return path
    return Path(args.fname) / path


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (without it, gdws replaces only the files it "
        "wrote itself in a folder it created)",
    )


def outputs(args: argparse.Namespace) -> Outputs:
    """The command's :class:`Outputs`, kept on ``args`` so a failure can say what was kept."""
    args.outputs = Outputs(args.command, overwrite=getattr(args, "overwrite", False))
    return args.outputs


def add_distributed_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    group = parser.add_argument_group(
        "scale-out and resuming (run under torchrun for several processes; docs/distributed.md)"
    )
    group.add_argument(
        "--workers",
        type=int,
        help="data-loading worker processes per process (default: 4 for imagenet's image "
        "files, 0 for the in-memory datasets)",
    )
    if not resume:
        return
    group.add_argument(
        "--resume-dir",
        help="where per-sample results are saved as the run goes, and resumed from "
        "(default: next to --json, <json>.partial)",
    )
    group.add_argument(
        "--save-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="least time between two saves of the per-sample results (default 60; 0: every batch)",
    )
    group.add_argument(
        "--fresh", action="store_true", help="discard saved results and start from the beginning"
    )


@contextlib.contextmanager
def distributed(args: argparse.Namespace, where: torch.device):
    """Join the ``torchrun`` group (a group of one otherwise); only rank 0 prints.

    The other processes run without progress bars and with their standard output
    discarded; their errors still reach standard error.
    """
    with contextlib.ExitStack() as stack:
        try:
            group = stack.enter_context(process_group(where))
        except ValueError as exc:  # inconsistent RANK / WORLD_SIZE
            raise UsageError(str(exc)) from None
        if not group.is_main:
            args.no_progress = True
            sink = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
        yield group


# -- model and data -----------------------------------------------------------------------


def architecture_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = MODEL_ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise UsageError(f"--model must be one of {sorted(ARCHITECTURES)}; got {name!r}.")
    return key


def input_shape(dataset: str, architecture: str) -> tuple[int, int, int]:
    """One sample's shape: the digits network's 16x16 gray, ImageNet's 224x224, or 32x32."""
    if (dataset == "digits") != architecture.startswith("digits_cnn"):
        raise UsageError(
            f"--model {architecture} does not fit --dataset {dataset}: digits_cnn takes the "
            "16x16 gray digits; the other architectures take 32x32 colour images."
        )
    if (dataset == "imagenet") != (architecture == "resnet50"):
        raise UsageError(
            f"--model {architecture} does not fit --dataset {dataset}: resnet50 takes the "
            "224x224 ImageNet images; the other architectures take 32x32 or 16x16 images."
        )
    if dataset == "imagenet":
        return (3, 224, 224)
    return (1, DIGITS_SIZE, DIGITS_SIZE) if dataset == "digits" else (3, 32, 32)


def build_network(args: argparse.Namespace, checkpoint: Path | None) -> nn.Module:
    """The bare architecture (no normalisation), with the checkpoint's weights if given."""
    architecture = architecture_name(args.model)
    input_shape(args.dataset, architecture)
    torch.manual_seed(args.seed)
    network = ARCHITECTURES[architecture](num_classes=num_classes(args.dataset))
    if checkpoint is not None:
        state, fmt, reason = read_checkpoint(
            checkpoint,
            getattr(args, "checkpoint_format", "auto"),
            folder_name=getattr(args, "fname", None) or None,
        )
        unused_block = any(_top_name(k) == "sub_block1" for k in state)
        if getattr(network, "sub_block1", None) is not None and not unused_block:
            network.sub_block1 = None  # the original deleted WRN's unused block before loading
        elif hasattr(network, "sub_block1") and network.sub_block1 is None and unused_block:
            raise UsageError(
                f"{str(checkpoint)!r} holds WRN's unused sub_block1, which --model "
                f"{args.model} lacks (the original deleted it before loading): use --model "
                "wrn_28_4, which keeps it."
            )
        try:
            missing = load_checked_state(network, state, fmt, repr(str(checkpoint)))
        except ValueError as exc:
            fits = [name for name in _architectures_named_like(state) if name != architecture]
            if not fits:
                raise
            aliases = {name: alias for alias, name in MODEL_ALIASES.items()}
            fits = [f"{n} (alias {aliases[n]})" if n in aliases else n for n in fits]
            raise ValueError(f"{exc} Its names are those of --model {' or '.join(fits)}.") from None
        print(LoadedCheckpoint(network, checkpoint, fmt, reason, missing).summary())
    return network.eval()


def _top_name(key: str) -> str:
    """The first component of a state-dict name, past ``module.``."""
    return key.removeprefix("module.").split(".", 1)[0]


def _architectures_named_like(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The architectures whose state dicts have exactly the names of ``state``."""
    names = {k.removeprefix("module.") for k in state}
    fits = []
    with torch.device("meta"):  # names only: no memory, no initialisation
        for name, build in ARCHITECTURES.items():
            if set(build().state_dict()) == names:
                fits.append(name)
    return fits


def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint``, or the run folder's checkpoint of ``--checkpoint-format`` (auto:
    the original's file for the folder's name, else ``model_best.pth``)."""
    if getattr(args, "checkpoint", None):
        path = Path(args.checkpoint)
        if not path.is_file():
            raise UsageError(f"no checkpoint at {str(path)!r}.")
        return path
    if not args.fname:
        raise UsageError("give --fname RUN (holding model_best.pth) or --checkpoint FILE.")
    try:
        path, _, _ = find_checkpoint(args.fname, getattr(args, "checkpoint_format", "auto"))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return path


def with_normalization(args: argparse.Namespace, network: nn.Module) -> nn.Module:
    return network if args.no_norm else normalized(network, args.dataset)


def dataset(args: argparse.Namespace, split: str):
    """The ``split`` of ``--dataset``, read once per command."""
    cache = args.__dict__.setdefault("_datasets", {})
    if split not in cache:
        cache[split] = load_dataset(args.dataset, args.data_dir, split, size=DIGITS_SIZE)
    return cache[split]


def loader(data, args: argparse.Namespace, n_samples: int | None = None, shuffle=False):
    if n_samples is not None and n_samples < len(data):
        data = Subset(data, range(n_samples))
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(data, batch_size=args.batch_size, shuffle=shuffle, generator=generator)


def load_alpha_file(args: argparse.Namespace) -> tuple[dict | None, Path | None]:
    """The channel weights of ``--alphas-filename`` (the original's alphas file), and its
    path; ``(None, None)`` without it."""
    path = in_run_folder(args, getattr(args, "alphas", None))
    if path is None:
        return None, None
    if not path.is_file():
        raise UsageError(f"--alphas-filename: no file at {str(path)!r}.")
    return load_channel_weights(path), path


def attack_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``[{"norm", "epsilon", "step"}]`` in pixel units, one per ``--norm``."""
    norms = args.norm if isinstance(args.norm, list) else [args.norm]
    if len(set(norms)) != len(norms):
        raise UsageError(f"--norm lists a norm twice: {norms}.")
    specs = []
    for flag, name in (("--epsilon", "epsilon"), ("--pgd-alpha", "pgd_alpha")):
        values = getattr(args, name)
        values = values if isinstance(values, list) else [values]
        if len(values) not in (1, len(norms)):
            raise UsageError(
                f"{flag} needs one value or one per --norm ({len(norms)}); got {len(values)}."
            )
        specs.append(values * len(norms) if len(values) == 1 else values)
    return [
        {"norm": norm, "epsilon": eps / 255, "step": step / 255, "epsilon_255": eps}
        for norm, eps, step in zip(norms, *specs, strict=True)
    ]


def resolve_attack_iters(args: argparse.Namespace) -> None:
    """``--attack-iters`` of an evaluating command (``None`` when not given): PGD's
    iterations (default 10, also the recovery's PGD) and APGD's (default 100)."""
    given = args.attack_iters
    args.apgd_iters = 100 if given is None else given
    args.attack_iters = 10 if given is None else given


def attack_label(kind: str, norm: str, epsilon_255: float, steps: int | None = None) -> str:
    """How tables and JSON name an attack: ``"Linf AutoAttack (eps 8/255)"``."""
    name = {
        "pgd": f"PGD-{steps}",
        "apgd": f"APGD-CE-{steps}",
        "autoattack": "AutoAttack",
        "autoattack-fast": "AutoAttack-fast",
    }[kind]
    return f"{norm} {name} (eps {epsilon_255:g}/255)"


def build_attack(
    kind: str,
    model: nn.Module,
    norm: str,
    eps: float,
    *,
    step: float | None = None,
    steps: int = 10,
    n_restarts: int = 1,
    seed: int = 0,
    l1_sparsity: float = 0.99,
):
    """One attack of ``--attack`` (not ``none``) on ``model``; sizes in pixel units."""
    if kind == "pgd":
        sparsity = l1_sparsity if norm == "L1" else None
        return PGD(
            model,
            eps,
            step,
            steps,
            norm=norm,
            n_restarts=n_restarts,
            seed=seed,
            sparsity=sparsity,
        )
    if kind == "apgd":
        return APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed)
    version = "fast" if kind == "autoattack-fast" else "standard"
    return AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed)


def make_attacks(
    args: argparse.Namespace, model: nn.Module, kind: str | None = None
) -> dict[str, Attack]:
    """``{label: attack}`` for ``--attack/--norm/--epsilon/...``; empty for ``none``.

    ``kind`` overrides ``--attack`` (the recovery's inputs are always PGD's).
    """
    kind = args.attack if kind is None else kind
    if kind == "none":
        return {}
    attacks = {}
    for spec in attack_specs(args):
        steps = getattr(args, "apgd_iters", 100) if kind == "apgd" else args.attack_iters
        label = attack_label(kind, spec["norm"], spec["epsilon_255"], steps)
        attacks[label] = build_attack(
            kind,
            model,
            spec["norm"],
            spec["epsilon"],
            step=spec["step"],
            steps=steps,
            n_restarts=args.restarts,
            seed=args.seed,
            l1_sparsity=args.l1_sparsity,
        )
    return attacks


def make_attack(
    args: argparse.Namespace, model: nn.Module, kind: str | None = None
) -> Attack | None:
    """The one attack of a command that takes a single ``--norm``."""
    attacks = make_attacks(args, model, kind)
    return next(iter(attacks.values()), None)


def masking_checks(
    model: nn.Module,
    data,
    device: torch.device,
    by_attack: Mapping[str, Any] | None = None,
    n_samples: int | None = None,
    attack: Any = None,
) -> dict[str, Any]:
    """The gradient-masking checks on the first :data:`MASKING_SAMPLES` inputs of
    ``data`` (at most ``n_samples``), printed; returns them as plain values.

    ``by_attack``: the ensembles' per-attack accuracies of the evaluation; without it, an
    ensemble ``attack`` (AutoAttack) is run on those inputs to get them.
    """
    from gdws_torch.robustness.masking import check_gradient_masking

    count = min(len(data), MASKING_SAMPLES, n_samples or MASKING_SAMPLES)
    images, labels = next(iter(DataLoader(Subset(data, range(count)), batch_size=count)))
    images, labels = images.to(device), labels.to(device)
    if not by_attack and hasattr(attack, "run"):
        by_attack = attack.run(images, labels).report
    report = check_gradient_masking(model, images, labels, by_attack=by_attack or None)
    print(report.format())
    return report.to_dict()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- output -------------------------------------------------------------------------------


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` is ``[(key, header)]``; floats to 2 decimals."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def write_json(args: argparse.Namespace, path: Path, data: Any) -> None:
    """``data`` (tensors and paths as plain values) to the declared output ``path``."""
    args.outputs.write_json(path, data, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def append_log(args: argparse.Namespace, path: Path, lines: Sequence[tuple[float, float]]) -> None:
    """The original's log: header ``epsilon<TAB>testacc``, then one line per result."""
    args.outputs.append_lines(path, [f"{eps:.8f}\t{accuracy:.3f}" for eps, accuracy in lines])


def check_gdws(args: argparse.Namespace) -> None:
    """The GDWS and recovery flags, against each other and the training data; before work."""
    if args.latency_batch_size < 1:
        raise UsageError(f"--latency-batch-size must be positive; got {args.latency_batch_size}.")
    if args.allocation == "global" and args.target_mac_reduction is None:
        raise UsageError("--allocation global needs --target-mac-reduction.")
    speedup = getattr(args, "target_speedup", None)
    if speedup is not None:
        if not (math.isfinite(speedup) and speedup > 1):
            raise UsageError(f"--target-speedup must be a number > 1; got {speedup}.")
        if args.latency_aware:
            raise UsageError(
                "--target-speedup already plans from measured latencies; drop --latency-aware."
            )
    check_speed_flags(args)
    if args.weighting != "unit" and getattr(args, "alphas", None) is not None:
        raise UsageError("--weighting and --alphas-filename exclude each other.")
    custom = custom_flags(args)
    if getattr(args, "recipe", None) and custom:
        raise UsageError(f"--recipe runs a whole recipe; it excludes {', '.join(custom)}.")
    if getattr(args, "recipe", None) and args.n_kernels is not None:
        raise UsageError("--recipe needs --target-mac-reduction, --target-speedup or --beta.")
    check_recovery(args)


def custom_flags(args: argparse.Namespace) -> list[str]:
    """The weighting and recovery flags given, which make a conversion of one's own."""
    given = [
        ("--weighting", args.weighting != "unit"),
        ("--alphas-filename", getattr(args, "alphas", None) is not None),
        ("--allocation", args.allocation != "common_beta"),
        ("--refit", bool(args.refit)),
        ("--recalibrate-bn", bool(args.recalibrate_bn)),
    ]
    return [flag for flag, on in given if on]


def check_recovery(args: argparse.Namespace) -> None:
    """``--refit``/``--recalibrate-bn``: counts within the training data, their attack."""
    if args.refit_iterations < 0:
        raise UsageError(f"--refit-iterations must be >= 0; got {args.refit_iterations}.")
    for flag, n, adversarial in (
        ("--refit", args.refit, args.refit_attack),
        ("--recalibrate-bn", args.recalibrate_bn, args.recalibrate_attack),
    ):
        if n < 0:
            raise UsageError(f"{flag} must be >= 0; got {n}.")
        if n and n > len(dataset(args, "train")):
            raise UsageError(
                f"{flag} {n} exceeds the {len(dataset(args, 'train'))} training inputs."
            )
        if n and adversarial and getattr(args, "attack", "none") == "none":
            raise UsageError(f"{flag}-attack needs an --attack (its inputs are PGD's flags).")


def cli_recipe(args: argparse.Namespace, default: bool) -> tuple[Recipe, str]:
    """The flags as a :class:`~gdws_torch.Recipe`, and why that one (printed).

    ``--recipe``; else the weighting and recovery flags of one's own
    (:func:`custom_flags`) as the recipe ``"custom"``; else, with ``default``, ``robust``
    when the training data are there (``unit`` without them, or with ``--n-kernels``);
    else ``unit``. A recipe's sample counts are capped to the training data's size.
    """
    custom = custom_flags(args)
    if getattr(args, "recipe", None):
        recipe, why = get_recipe(args.recipe), "--recipe"
    elif custom:
        refit = None
        if args.refit:
            refit = Refit(
                samples=args.refit,
                adversarial=args.refit_attack,
                depthwise=args.refit_depthwise,
                iterations=args.refit_iterations,
            )
        batchnorm = None
        if args.recalibrate_bn:
            batchnorm = BatchNormStatistics(args.recalibrate_bn, args.recalibrate_attack)
        recipe = Recipe(
            "custom",
            weighting=Weighting(args.weighting),
            allocation=args.allocation,
            recovery=Recovery(refit=refit, batchnorm=batchnorm),
            description="the command line's weighting and recovery flags",
        )
        why = f"your flags ({', '.join(custom)})"
    elif not default:
        recipe, why = RECIPES["unit"], ""
    elif args.n_kernels is not None:
        recipe, why = RECIPES["unit"], "--n-kernels: the default recipe takes another budget"
    else:
        try:
            dataset(args, "train")
        except (FileNotFoundError, ValueError) as exc:
            why = f"no training data ({exc}); --data-dir for the robust recipe"
            recipe = RECIPES["unit"]
        else:
            recipe, why = RECIPES["robust"], "the default with training data"
    if recipe.needs_data:
        recipe = _capped(recipe, len(dataset(args, "train")), quiet=bool(custom))
    return recipe, why


def _capped(recipe: Recipe, available: int, quiet: bool) -> Recipe:
    """``recipe`` with every sample count at most ``available``; says so unless ``quiet``."""
    weighting, refit, batchnorm = recipe.weighting, recipe.recovery.refit, recipe.recovery.batchnorm
    capped = recipe.replace(
        weighting=dataclasses.replace(weighting, samples=min(weighting.samples, available)),
        recovery=Recovery(
            refit=refit and dataclasses.replace(refit, samples=min(refit.samples, available)),
            batchnorm=batchnorm
            and dataclasses.replace(batchnorm, samples=min(batchnorm.samples, available)),
        ),
    )
    if capped != recipe and not quiet:
        print(f"the training data hold {available} inputs: the recipe uses at most that many")
    return capped


def approximate(
    args: argparse.Namespace,
    network: nn.Module,
    shape: Sequence[int],
    default_recipe: bool = False,
):
    """``network`` compressed by the recipe the flags ask for (:func:`cli_recipe`), for the
    budget of ``--beta/--target-mac-reduction/--n-kernels/--target-speedup``, through
    :func:`gdws_torch.compress` (the flags were checked by :func:`check_gdws`).

    ``--alphas-filename`` gives the channel weights. Returns ``(compressed copy, report,
    alphas file or None)``; prints the report.
    """
    recipe, why = cli_recipe(args, default_recipe)
    print(recipe.summary() + (f" ({why})" if why else ""))
    channel_weights, alphas_path = load_alpha_file(args)
    error_weights = None
    if channel_weights is not None:
        error_weights = ErrorWeights(channel_weights)
        print(f"channel weights from {alphas_path} (--alphas-filename)")
    # Weights, attacks and statistics from the data see pixels, as the data loader gives.
    model = with_normalization(args, network) if recipe.needs_data else network
    data = loader(dataset(args, "train"), args) if recipe.needs_data else None
    eps, step = calibration_attack(args) if recipe.crafts else (8 / 255, None)
    try:
        converted, report = compress(
            model,
            data,
            recipe=recipe,
            eps=eps,
            attack_steps=getattr(args, "attack_iters", None) or 10,
            attack_alpha=step,
            error_weights=error_weights,
            input_size=shape,
            latency=cli_latency(args, keep_faster=args.latency_aware),
            only_if_cheaper=not args.replace_all,
            skip_first=not args.include_first,
            seed=args.seed,
            progress=not getattr(args, "no_progress", False),
            require_target=not getattr(args, "allow_miss", False),
            **cli_budget(args, n_kernels=True),
        )
    except SpeedTargetMissed as exc:
        raise speed_target_missed(exc) from None
    if model is not network:  # the network's own layer names, without the wrapper's
        converted = converted.module
        report = report.renamed(lambda name: name.removeprefix("module."))
    print(report.format_table(inputs="training inputs"))
    say_accepted_miss(args, report)
    return converted, report, alphas_path


def cli_budget(args: argparse.Namespace, n_kernels: bool = False) -> dict[str, Any]:
    """The budget keyword of ``--target-speedup``/``--target-mac-reduction``/``--n-kernels``
    /``--beta`` (the original's default: ``beta=0``)."""
    if getattr(args, "target_speedup", None) is not None:
        return {"target_speedup": args.target_speedup}
    if args.target_mac_reduction is not None:
        return {"target_mac_reduction": args.target_mac_reduction}
    if n_kernels and args.n_kernels is not None:
        return {"n_kernels": args.n_kernels}
    return {"beta": 0.0 if args.beta is None else args.beta}


def cli_latency(args: argparse.Namespace, keep_faster: bool = False) -> Latency:
    """Where ``--target-speedup`` and ``--latency-aware`` time layers."""
    table = getattr(args, "latency_table_object", None)
    return Latency(
        backend=args.backend,
        batch_size=args.latency_batch_size,
        device=device(args) if hasattr(args, "device") else "cpu",
        table=getattr(args, "latency_table", None) if table is None else table,
        keep_faster=keep_faster,
    )


def calibration_attack(args: argparse.Namespace) -> tuple[float, float | None]:
    """The radius and step (pixel units) of a recipe's Linf PGD calibration: the Linf
    ``--epsilon`` and ``--pgd-alpha`` (eval takes one per ``--norm``: the Linf one), else
    8/255 and the recipe's default step."""
    if not hasattr(args, "epsilon"):
        return 8 / 255, None
    specs = [spec for spec in attack_specs(args) if spec["norm"] == "Linf"]
    if not specs:
        print("the recipe calibrates on Linf PGD inputs: at the default 8/255 (no Linf --norm)")
        return 8 / 255, None
    return specs[0]["epsilon"], specs[0]["step"]


def _recovery_attack(args: argparse.Namespace, adversarial: bool):
    """The attack factory of ``--refit-attack``/``--recalibrate-attack``, or ``None``."""
    return (lambda model: make_attack(args, model, kind="pgd")) if adversarial else None


def recalibrate(args: argparse.Namespace, network: nn.Module) -> None:
    """``--recalibrate-bn N``: BatchNorm statistics of ``network`` from N training inputs."""
    from gdws_torch.recovery import recalibrate_batchnorm

    if not batchnorm_layers(network):
        print("no BatchNorm layer: nothing to recalibrate (--recalibrate-bn ignored)")
        return
    attack = _recovery_attack(args, args.recalibrate_attack)
    model = with_normalization(args, network)
    recalibrate_batchnorm(
        model,
        loader(dataset(args, "train"), args, shuffle=True),
        args.recalibrate_bn,
        attack=attack,
        inplace=True,
        progress=not getattr(args, "no_progress", False),
    )
    kind = "natural and PGD" if attack else "natural"
    print(f"BatchNorm statistics re-estimated on {args.recalibrate_bn} {kind} training inputs")
