"""A tiny training run in its own process, for crash tests: ``train_worker.py OUT [--resume]``."""

import sys

from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.training.loop import train

if __name__ == "__main__":
    cfg = tiny_config(train__epochs=3, train__bank_refresh_every=2)
    train(cfg, sys.argv[1], resume="--resume" in sys.argv, splits=tiny_splits(), model=tiny_model(), progress=False)
