"""Runs a tiny training, alone or under torchrun (tests/training/test_loop.py compares the two).

``ddp_worker.py OUT``: in-memory tiny images. ``ddp_worker.py OUT FOLDER``: an unlabelled image
folder (which may hold unreadable files), read with the folder loader and 2 DataLoader workers.
"""

import sys

from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.training.loop import train

if __name__ == "__main__":
    if len(sys.argv) > 2:
        from plmetric.data.datasets import load_dataset
        from plmetric.data.backbones import build_transform

        cfg = tiny_config(train__epochs=2, train__bank_refresh_every=1, data__num_workers=2)
        # the deterministic transform for training too: random crops would differ between 1 and 2 ranks
        transform = build_transform("efficientnet_lite0", 16, train=False)
        splits = load_dataset("images", sys.argv[2], transform, transform, verbose=False)
        train(cfg, sys.argv[1], splits=splits, model=tiny_model(), progress=False)
        sys.exit(0)
    splits = tiny_splits(per_class=10)
    # an odd test split (37 images) so that sharding over 2 ranks is uneven
    splits.test.labels = splits.test.labels[:37]
    splits.test.arrays = splits.test.arrays[:37]
    cfg = tiny_config(train__epochs=2, train__bank_refresh_every=1)
    train(cfg, sys.argv[1], splits=splits, model=tiny_model(), progress=False)
