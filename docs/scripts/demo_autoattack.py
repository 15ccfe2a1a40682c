"""The demo network and its 2x robust-recipe GDWS model under PGD-20 and AutoAttack.

Builds the demo's "GDWS 2x, data, global + joint refit + BN" model exactly as ``gdws
demo`` does (the same recipe, calibration digits and attack settings), then evaluates the
dense and the GDWS model on the first ``--n-test`` test digits under Linf PGD-20 and
AutoAttack (``--version fast``: APGD-CE + APGD-T; ``standard``: + FAB-T and Square), all at
eps 24/255, seed 0, and prints one row per model and attack plus the gradient-masking
checks of both models. Run: ``python docs/scripts/demo_autoattack.py [--n-test N]
[--version fast|standard]``.
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader, Subset

from gdws_torch import AutoAttack, check_gradient_masking, compress, recipe_inputs
from gdws_torch.experiments.demo import (
    BEST,
    CALIBRATION_ATTACK,
    DEMO_ATTACK,
    INPUT_SHAPE,
    VALIDATION_DIGITS,
    demo_network,
    demo_recipes,
)
from gdws_torch.io.datasets import load_dataset
from gdws_torch.nn.module_tree import set_fused
from gdws_torch.robustness.attacks import PGD
from gdws_torch.robustness.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--version", choices=("fast", "standard"), default="fast")
    args = parser.parse_args()
    network = demo_network()
    held_out = load_dataset("digits", split="test", size=INPUT_SHAPE[-1])
    test = Subset(held_out, range(len(held_out) - VALIDATION_DIGITS))
    loader = DataLoader(test, batch_size=200)
    train = load_dataset("digits", split="train", size=INPUT_SHAPE[-1])
    inputs = recipe_inputs(
        network,
        DataLoader(train, batch_size=250),
        demo_recipes()[BEST],
        input_size=INPUT_SHAPE,
        seed=0,
        progress=False,
        eps=CALIBRATION_ATTACK["eps"],
        attack_steps=CALIBRATION_ATTACK["steps"],
    )
    gdws, _ = compress(network, inputs=inputs, target_mac_reduction=2.0, input_size=INPUT_SHAPE)
    models = {"dense": network, f"GDWS 2x, {BEST}": set_fused(gdws, True)}
    name = f"AutoAttack-{args.version}" if args.version == "fast" else "AutoAttack"
    print(f"{args.n_test} test digits, Linf eps 24/255, seed 0")
    print(f"{'model':<42} {'natural %':>9} {'PGD-20 %':>9} {name + ' %':>19} {'seconds':>8}")
    for label, model in models.items():
        start = time.perf_counter()
        attacks = {
            "pgd": PGD(model, **DEMO_ATTACK, seed=0),
            "aa": AutoAttack(model, norm="Linf", eps=DEMO_ATTACK["eps"], version=args.version),
        }
        result = evaluate(model, loader, attacks, n_samples=args.n_test, progress=False)
        seconds = time.perf_counter() - start
        print(
            f"{label:<42} {result['natural']:>9.2f} {result['attacks']['pgd']:>9.2f} "
            f"{result['attacks']['aa']:>19.2f} {seconds:>8.1f}"
        )
        images, labels = next(iter(DataLoader(Subset(test, range(100)), batch_size=100)))
        by_attack = result.get("by_attack", {}).get("aa")
        print(check_gradient_masking(model, images, labels, by_attack=by_attack).format())


if __name__ == "__main__":
    main()
