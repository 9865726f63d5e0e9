"""plmetric.core.options: defaults defined once, checks, composition, and how functions take them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from plmetric.config.schema import Config, load_config
from plmetric.manifold.pieces import fit_pieces, plm_similarity, point_similarity
from plmetric.core.options import ManifoldOptions, PieceOptions, PLMOptions, SimilarityOptions, STMLOptions, resolve


def test_the_plm_section_is_pieces_plus_similarities_plus_losses():
    names = {f.name for f in dataclasses.fields(PLMOptions)}
    assert {f.name for f in dataclasses.fields(PieceOptions)} <= names
    assert {f.name for f in dataclasses.fields(SimilarityOptions)} <= names
    assert isinstance(Config().plm, PieceOptions) and isinstance(Config().plm, SimilarityOptions)
    assert isinstance(Config().plm, ManifoldOptions) and isinstance(Config().stml, STMLOptions)


def test_resolve_reads_the_fields_of_a_larger_section_and_overrides_single_ones():
    cfg = load_config(None, ["plm.tau=2.0", "plm.n_alpha=3.0"])
    pieces = resolve(PieceOptions, cfg.plm)
    assert type(pieces) is PieceOptions and pieces.tau == 2.0 and pieces.m == 2
    assert resolve(SimilarityOptions, cfg.plm, n_beta=1.5) == SimilarityOptions(n_alpha=3.0, n_beta=1.5)
    assert resolve(PieceOptions) == PieceOptions()
    with pytest.raises(TypeError, match="PieceOptions has no option n_alpha"):
        resolve(PieceOptions, n_alpha=1.0)
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        resolve(PieceOptions, tau=-1.0)


def test_a_config_section_and_keywords_give_the_same_result():
    x = torch.nn.functional.normalize(torch.randn(30, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = load_config(None, ["plm.tau=1.0", "plm.m=1", "plm.symmetrize=max"])
    by_section = plm_similarity(x, cfg.plm)
    by_keywords = plm_similarity(x, tau=1.0, m=1, symmetrize="max")
    assert torch.equal(by_section, by_keywords)
    pieces = fit_pieces(x, cfg.plm)
    assert torch.equal(point_similarity(pieces, cfg.plm), by_section)


@pytest.mark.parametrize(
    ("section", "fields", "message"),
    [
        ("plm", {"m": 0}, "plm.m must be an integer >= 1"),
        ("plm", {"min_points": 2}, "plm.min_points must be an integer >= 3"),
        ("plm", {"n_max": 2}, "plm.n_max must be an integer >= 3"),
        ("plm", {"n_beta": -1.0}, "plm.n_beta must be a finite number >= 0"),
        ("plm", {"loss_form": "hinge"}, "plm.loss_form must be regression or contrastive"),
        ("plm", {"num_proxies": -1}, "plm.num_proxies must be an integer >= 0"),
        ("stml", {"sigma": 0.0}, "stml.sigma must be a finite number > 0"),
        ("stml", {"query_expansion": 0}, "stml.query_expansion must be an integer >= 1"),
        ("supervised", {"per_class": 1}, "supervised.per_class must be an integer >= 2"),
        ("supervised", {"beta": float("inf")}, "supervised.beta must be a finite number > 0"),
    ],
)
def test_config_validation_names_the_section_and_key(section, fields, message):
    cfg = Config()
    for name, value in fields.items():
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_float_option_of_every_options_class_refuses_non_finite_numbers(bad):
    import typing

    from plmetric.core import options as options_module

    classes = [getattr(options_module, name) for name in options_module.__all__]
    classes = [c for c in classes if isinstance(c, type) and dataclasses.is_dataclass(c)]
    checked = 0
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if hints[field.name] is not float and set(typing.get_args(hints[field.name])) != {float, type(None)}:
                continue
            options = cls(**{field.name: bad})
            with pytest.raises(ValueError, match=rf"^sec\.{field.name} must be a finite number"):
                options.validate(where="sec.")
            checked += 1
    assert checked >= 15  # the float options of PLMOptions, STMLOptions, SupervisedOptions and their parts
