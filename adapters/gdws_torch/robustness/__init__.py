"""Robustness: attacks, evaluation (resumable, distributed) and adversarial training."""
