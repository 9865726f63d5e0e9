"""Config: YAML files, overrides, validation, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plmetric.config.schema import Config, load_config, save_config, valid_keys


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "demo"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(name)
    assert cfg.train.batch_size % cfg.train.neighbours_per_seed == 0


def test_paper_settings_in_configs():
    paper, sop = load_config("cub200_paper"), load_config("sop")
    assert paper.data.dataset == "cub200" and paper.model.embedding_dim == 512 and paper.train.momentum == 0.999
    assert (paper.train.lr_backbone, paper.train.lr_embedding, paper.train.keep) == (1e-4, 1e-3, "student")
    assert (paper.plm.n_alpha, paper.plm.n_beta, paper.plm.m, paper.plm.num_proxies) == (5.0, 0.5, 2, 300)
    assert sop.train.momentum == 0.9 and sop.train.neighbours_per_seed == 2


def test_recipe_configs_share_the_method_settings_and_differ_in_training():
    import dataclasses

    recipe, paper = load_config("cub200"), load_config("cub200_paper")
    # the three-data-set recipe: METHOD.md's PLM options but targets from the pooled features, no proxies
    assert recipe.plm == dataclasses.replace(paper.plm, target_space="features", num_proxies=0)
    assert recipe.data == paper.data
    assert (recipe.train.momentum, recipe.train.lr_backbone, recipe.train.lr_embedding) == (0.99, 1e-5, 3e-4)
    assert (recipe.train.keep, recipe.train.teacher_view, recipe.model.embedding_init) == ("teacher", "clean", "pca")
    for name in ("cars196", "sop", "plankton106"):
        other = load_config(name)
        assert (other.train.keep, other.train.teacher_view, other.train.lr_backbone) == ("teacher", "clean", 1e-5)
        assert (other.plm.target_space, other.plm.num_proxies) == ("features", 0), name
    # the folder preset (train --images): the pile recipe of docs/results.md for the head mode a CPU gets
    folder = load_config("folder")
    assert (folder.train.mode, folder.train.views, folder.train.min_steps) == ("auto", 5, 300)
    assert (folder.plm.target_space, folder.train.lr_embedding, folder.train.select) == ("embedding", 1e-3, "final")


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.epochs=7",
            "plm.binary=true",
            "train.grad_clip=none",
            "data.root=/x",
            "plm.tau=1",
            "train.lr_backbone=3e-5",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.plm.binary is True and cfg.train.grad_clip is None
    assert cfg.data.root == "/x" and cfg.plm.tau == 1.0 and isinstance(cfg.plm.tau, float)
    assert cfg.train.lr_backbone == pytest.approx(3e-5)


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'.*train.epochs"):
        load_config(None, ["train.epoch=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("plm:\n  n_gamma: 3\n")
    with pytest.raises(ValueError, match="plm.n_gamma.*plm.n_alpha"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "train.epochs: expected int"),
        ("plm.binary=maybe", "expected true or false"),
        ("train.batch_size=121", "divisible"),
        ("plm.symmetrize=median", "mean, min or max"),
        ("plm.delta_mode=auto", "fixed, batch or teacher"),
        ("epochs", "key=value"),
        ("train.momentum=1.5", r"\[0, 1\]"),
    ],
)
def test_bad_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=5", "plm.symmetrize=max"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["epochs"] == 5


def test_valid_keys_cover_every_section():
    keys = valid_keys(Config())
    assert {"data.dataset", "model.backbone", "plm.n_alpha", "train.epochs"} <= set(keys)


def test_unknown_key_suggests_the_closest_valid_one():
    with pytest.raises(ValueError, match=r"did you mean 'plm.n_alpha'\?"):
        load_config(None, ["plm.n_alfa=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'zzz.qqq'; valid keys"):
        load_config(None, ["zzz.qqq=1"])
