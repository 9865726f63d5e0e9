"""The similarity study of plmetric.studies.similarity: batches, the study and its sweeps, files, the cache, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from point_sets import sphere_clusters

from plmetric.studies import similarity as sim
from plmetric.cli import main
from plmetric.evaluation.estimators import ESTIMATORS

# ------------------------------------------------------------------------------------------ the study


def test_neighbourhood_batches_have_no_repeats_and_hold_neighbourhoods():
    x, _ = sphere_clusters(n_per=20, classes=4)
    batches = sim.neighbourhood_batches(x, batch_size=20, k=5, n_batches=7, seed=3)
    assert len(batches) == 7  # 80 points / 4 seeds = 20 batches per epoch
    for b in batches:
        assert len(b) == len(set(b.tolist())) and 4 < len(b) <= 20
    with pytest.raises(ValueError, match="divisible"):
        sim.neighbourhood_batches(x, batch_size=21, k=5)
    with pytest.raises(ValueError, match="exceeds"):
        sim.neighbourhood_batches(x, batch_size=200, k=5)


def test_run_study_and_sweep_structure():
    x, y = sphere_clusters(n_per=20, classes=6, d=10, spread=0.15)
    study = sim.run_study(x, y, estimators=("plm", "gaussian", "kmeans"), batch_size=30, k=5, n_batches=4)
    assert study["settings"]["n_batches"] == 4 and study["settings"]["points"] == 120
    plm = study["estimators"]["plm"]
    assert set(plm["batch"]) >= {"correlation_mean", "correlation_std", "purity_mean", "group_size_mean"}
    assert "purity" not in study["estimators"]["gaussian"]["whole_set"]
    assert -1 <= plm["whole_set"]["correlation"] <= 1
    table = sim.format_study_table(study)
    assert table.count("\n|") == 5  # header, separator, 3 rows
    assert "| plm | PLM" in table and table.splitlines()[2].count("|") == 11
    verdict = sim.ordering_verdict(study)
    assert verdict["batch"]["best_paper_baseline"] == "kmeans"
    rows = sim.run_sweep(x, y, grid={"tau": (0.5, 1.0), "k": (3, 5)}, batch_size=30, n_batches=3)
    assert [(r["parameter"], r["value"], r["default"]) for r in rows] == [
        ("tau", 0.5, True),
        ("tau", 1.0, False),
        ("k", 3, False),
        ("k", 5, True),
    ]
    assert rows[0]["batch_correlation_mean"] == rows[3]["batch_correlation_mean"]  # same setting, same batches
    assert "| plm | tau | 0.5 * |" in sim.format_sweep_table(rows)
    with pytest.raises(ValueError, match="unknown estimator"):
        sim.run_study(x, y, estimators=("nope",))
    with pytest.raises(ValueError, match="labels"):
        sim.run_study(x, y[:-1])


def test_baseline_sweep_rows_and_defaults():
    x, y = sphere_clusters(n_per=20, classes=6, d=10, spread=0.15)
    grid = {"kmeans": {"points_per_cluster": (5, 20)}, "random_walk": {"alpha": (0.9, 0.99)}}
    rows = sim.run_baseline_sweep(x, y, grid=grid, batch_size=30, n_batches=3)
    assert [(r["estimator"], r["value"], r["default"]) for r in rows] == [
        ("kmeans", 5, True),
        ("kmeans", 20, False),
        ("random_walk", 0.9, False),
        ("random_walk", 0.99, True),
    ]
    # 30-point batches of 6 neighbourhoods: 20 points per cluster merges neighbourhoods of several classes.
    assert rows[0]["batch_purity_mean"] > rows[1]["batch_purity_mean"]
    assert "| kmeans | points_per_cluster | 5 * |" in sim.format_sweep_table(rows)


def test_the_default_study_is_every_estimator():
    """No hand-kept list: ``--estimators all`` (the default) is every registered estimator."""
    from plmetric.cli import build_parser

    assert tuple(ESTIMATORS) == sim.DEFAULT_STUDY
    args = build_parser().parse_args(["similarity-study", "--features", "f.npy"])
    assert args.estimators == "all"


# ------------------------------------------------------------------------------------------ files and CLI


def _write_tiny(tmp_path):
    x, y = sphere_clusters(n_per=12, classes=5, d=6, spread=0.2)
    np.save(tmp_path / "feat.npy", x.float().numpy())
    np.save(tmp_path / "labels.npy", y.numpy())
    return tmp_path / "feat.npy", tmp_path / "labels.npy"


def test_cli_on_tiny_features_writes_json_and_png(tmp_path, capsys):
    feats, labels = _write_tiny(tmp_path)
    out = tmp_path / "out" / "study.json"
    argv = ["similarity-study", "--features", str(feats), "--labels", str(labels), "--batch-size", "20"]
    argv += ["--batches", "3", "--estimators", "plm,gaussian,kmeans,stml", "--set", "plm.tau=1.0", "--json", str(out)]
    assert main([*argv, "--sweep", "--no-progress"]) == 0
    report = json.loads(out.read_text())
    study = report["splits"]["feat"]
    assert list(study["estimators"]) == ["plm", "gaussian", "kmeans", "stml"]
    assert study["estimators"]["plm"]["options"] == {"tau": 1.0}
    assert study["settings"]["n_batches"] == 3 and len(study["sweep"]) == sum(map(len, sim.DEFAULT_SWEEP.values()))
    n_baseline = sum(len(v) for opts in sim.DEFAULT_BASELINE_SWEEP.values() for v in opts.values())
    assert len(study["baseline_sweep"]) == n_baseline
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| plm |" in printed and "PLM parameter sweep" in printed


def test_cli_bad_input_gives_clear_errors(tmp_path, capsys):
    feats, labels = _write_tiny(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros(59, dtype=np.int64))
    assert main(["similarity-study", "--features", str(feats), "--labels", str(tmp_path / "short.npy")]) == 2
    assert "59 labels but" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(tmp_path / "missing.npy"), "--labels", str(labels)]) == 2
    assert "features file not found" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(feats)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(feats), "--labels", str(labels), "--set", "plm=1"]) == 2
    assert "ESTIMATOR.OPTION=VALUE" in capsys.readouterr().err
    assert main(["similarity-study"]) == 2


def test_features_file_safetensors_with_labels(tmp_path):
    from safetensors.torch import save_file

    x, y = sphere_clusters(n_per=4, classes=2)
    save_file({"embeddings": x.float(), "labels": y}, str(tmp_path / "f.safetensors"))
    fx, fy = sim.load_features_file(tmp_path / "f.safetensors")
    assert fx.shape == (8, 8) and torch.equal(fy, y)
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npy or .safetensors"):
        sim.load_features_file(tmp_path / "f.csv")


def test_feature_cache_embeds_once(tmp_path, monkeypatch):
    import tiny

    import plmetric.data.datasets
    import plmetric.data.backbones

    calls = []
    splits = tiny.tiny_splits(per_class=3, classes=4)

    def fake_load(name, root, train_transform=None, test_transform=None, verbose=True):
        calls.append(name)
        return splits

    monkeypatch.setattr(plmetric.data.datasets, "load_dataset", fake_load)
    monkeypatch.setattr(plmetric.data.backbones, "build_transform", lambda *a, **k: splits.train.transform)
    monkeypatch.setattr(plmetric.data.backbones, "create_model", lambda *a, **k: tiny.tiny_model(embedding_dim=0))
    cache = tmp_path / "cache"
    root = tmp_path / "data"
    root.mkdir()
    x1, y1, info1 = sim.cached_features("cub200", str(root), "train", cache_dir=cache, progress=False)
    x2, y2, info2 = sim.cached_features("cub200", str(root), "train", cache_dir=cache, progress=False)
    assert calls == ["cub200"] and not info1["cache_hit"] and info2["cache_hit"]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (6, 24)
    assert info1["cache_file"] != str(sim.feature_cache_path(cache, "cub200", str(root), "test", "efficientnet_lite0"))
    with pytest.raises(ValueError, match="inside the data folder"):
        sim.cached_features("cub200", str(root), "train", cache_dir=root / "cache", progress=False)


def test_cli_dataset_path_runs_both_halves(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_cached(dataset, root, split, backbone, **kwargs):
        calls.append((dataset, split, backbone, kwargs["image_size"], kwargs["cache_dir"]))
        x, y = sphere_clusters(n_per=8, classes=5, d=6, spread=0.2, seed=len(calls))
        return x.float(), y, {"cache_file": str(tmp_path / f"{split}.safetensors"), "cache_hit": True}

    monkeypatch.setattr(sim, "cached_features", fake_cached)
    out = tmp_path / "s.json"
    argv = ["similarity-study", "--dataset", "cub200", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    argv += ["--batch-size", "20", "--batches", "2", "--estimators", "plm,kmeans", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert [c[1] for c in calls] == ["train", "test"]
    assert calls[0][2:] == ("efficientnet_lite0", 224, str(tmp_path / "c"))
    report = json.loads(out.read_text())
    assert list(report["splits"]) == ["train", "test"]
    assert report["splits"]["test"]["verdict"]["batch"]["best_paper_baseline"] == "kmeans"
    assert "read from cache" in capsys.readouterr().out
    assert main([*argv, "--features", str(out)]) == 2  # a data set and a features file: ambiguous


def test_cached_views_are_the_prefix_of_clean_and_augmented_images(tmp_path, monkeypatch):
    """View 0 is the clean image through the first stages; the others are random crops, seeded:
    a second call reads the cache."""
    from image_trees import make_tree

    from plmetric.data.backbones import build_transform, create_model
    from plmetric.training.networks import split_backbone

    root, _ = make_tree("folder", tmp_path / "data", classes=4, per_class=3, bad=0)
    cache = tmp_path / "cache"
    views, labels, info = sim.cached_views(
        "folder", str(root), "train", image_size=32, frozen=3, views=3, cache_dir=cache, num_workers=0, progress=False
    )
    assert views.shape[:2] == (3, 6) and views.dtype == torch.float16 and not info["cache_hit"]
    model = create_model("efficientnet_lite0", embedding_dim=0, pretrained=True).eval()
    prefix = split_backbone(model, 3)[0].eval()
    from PIL import Image

    from plmetric.data.datasets import load_dataset

    part = load_dataset("folder", str(root), verbose=False).train
    with Image.open(part.paths[0]) as img:
        clean = prefix(build_transform("efficientnet_lite0", 32)(img.convert("RGB")).unsqueeze(0))[0]
    assert torch.allclose(views[0, 0].float(), clean, rtol=1e-2, atol=1e-2)  # float16 storage
    assert not torch.equal(views[1], views[0]) and not torch.equal(views[1], views[2])
    again, _, info2 = sim.cached_views(
        "folder", str(root), "train", image_size=32, frozen=3, views=3, cache_dir=cache, num_workers=0, progress=False
    )
    assert info2["cache_hit"] and torch.equal(again, views)
    test_views, _, _ = sim.cached_views(
        "folder", str(root), "test", image_size=32, frozen=3, views=3, cache_dir=cache, num_workers=0, progress=False
    )
    assert test_views.shape[0] == 1


def test_the_feature_caches_key_on_a_non_default_eval_rule_only(tmp_path):
    """``eval_resize`` enters the cache key and file name only when not the default: the files made
    before the rule was a choice keep their names (and are found again); a ``whole`` cache is its own."""
    import hashlib

    old_key = {  # the key cached_features wrote before eval_resize existed
        "dataset": "cub200", "root": None, "split": "test", "backbone": "efficientnet_lite0", "image_size": 224,
        "weights": None, "features": "pooled (avg + max), L2-normalised, eval transform", "version": 1,
    }
    digest = hashlib.sha1(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:12]
    crop = sim.feature_cache_path(tmp_path, "cub200", None, "test", "efficientnet_lite0")
    assert crop == tmp_path / f"cub200-test-efficientnet_lite0-224px-{digest}.safetensors"
    default = sim.feature_cache_path(tmp_path, "cub200", None, "test", "efficientnet_lite0", eval_resize="center_crop")
    assert default == crop
    whole = sim.feature_cache_path(tmp_path, "cub200", None, "test", "efficientnet_lite0", eval_resize="whole")
    assert whole.name.startswith("cub200-test-efficientnet_lite0-224px-whole-") and whole.name[-24:] != crop.name[-24:]
