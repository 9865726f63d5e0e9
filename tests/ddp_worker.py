"""Runs a tiny training, alone or under torchrun (tests/test_training.py compares the two)."""

import sys

from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.training import train

if __name__ == "__main__":
    splits = tiny_splits(per_class=10)
    # an odd test split (37 images) so that sharding over 2 ranks is uneven
    splits.test.labels = splits.test.labels[:37]
    splits.test.arrays = splits.test.arrays[:37]
    cfg = tiny_config(train__epochs=2, train__bank_refresh_every=1)
    train(cfg, sys.argv[1], splits=splits, model=tiny_model(), progress=False)
