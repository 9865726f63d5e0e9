"""Tiny models and data sets for fast trainer tests (no backbone download, no BatchNorm)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from plmetric.config.schema import Config
from plmetric.data.datasets import DatasetSplits, ImageDataset
from plmetric.data.backbones import EmbeddingModel


def tiny_model(embedding_dim: int = 16, seed: int = 0) -> EmbeddingModel:
    """A two-layer CNN trunk wrapped as an ``EmbeddingModel`` (deterministic weights)."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 24, 3, stride=2), nn.ReLU())
    return EmbeddingModel("tiny", trunk, feature_dim=24, embedding_dim=embedding_dim)


def tiny_splits(per_class: int = 10, classes: int = 8, size: int = 12, seed: int = 0) -> DatasetSplits:
    """In-memory images: each class a noisy colour pattern; first half of the classes trains."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(classes, size, size, 3))
    images, labels = [], []
    for c in range(classes):
        noise = rng.normal(0, 40, size=(per_class, size, size, 3))
        images.append(np.clip(patterns[c] + noise, 0, 255).astype(np.uint8))
        labels += [c] * per_class
    images_arr, labels_arr = np.concatenate(images), np.array(labels)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    train_mask = labels_arr < classes // 2
    train = ImageDataset(images_arr[train_mask], labels_arr[train_mask], to_tensor, name="tiny-train")
    test = ImageDataset(images_arr[~train_mask], labels_arr[~train_mask], to_tensor, name="tiny-test")
    return DatasetSplits("tiny", train, test)


def tiny_config(**overrides) -> Config:
    """A CPU config sized for ``tiny_splits``; overrides as ``section__key=value``."""
    cfg = Config()
    cfg.data.num_workers = 0
    cfg.model.embedding_dim = 16
    cfg.plm.num_proxies = 6
    cfg.train.epochs = 3
    cfg.train.batch_size = 10
    cfg.train.neighbours_per_seed = 5
    cfg.train.momentum = 0.9
    cfg.train.device = "cpu"
    cfg.train.bank_refresh_every = 2
    cfg.train.eval_batch_size = 16
    cfg.train.warmup_epochs = 0.5
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cfg.validate()
    return cfg
