"""The command line: eval, train, embed/index/search, demo, and its error messages."""

from __future__ import annotations

import json
import shutil
import urllib.error

import numpy as np
import pytest
from PIL import Image

from plmetric.cli import main


def test_eval_digits_writes_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(
        [
            "eval",
            "--dataset",
            "digits",
            "--backbone",
            "efficientnet_lite0",
            "--embedding-dim",
            "0",
            "--image-size",
            "32",
            "--json",
            str(out),
            "--no-progress",
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 896 and metrics["num_classes"] == 5
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["recall@1"] > 0.5  # pretrained features separate digits far above chance (0.2)
    assert "recall@1" in capsys.readouterr().out


def test_eval_on_cub_slice(tmp_path, cub_root):
    """The real CUB layout, cut to 4 classes x 6 images so the test stays fast."""
    src = cub_root / "CUB_200_2011"
    dst = tmp_path / "CUB_200_2011"
    (dst / "images").mkdir(parents=True)
    lines, labels = [], []
    for cls in range(1, 5):
        folder = sorted((src / "images").iterdir())[cls - 1]
        for image in sorted(folder.iterdir())[:6]:
            (dst / "images" / folder.name).mkdir(exist_ok=True)
            shutil.copy(image, dst / "images" / folder.name / image.name)
            lines.append(f"{len(lines) + 1} {folder.name}/{image.name}")
            labels.append(f"{len(labels) + 1} {cls}")
    (dst / "images.txt").write_text("\n".join(lines) + "\n")
    (dst / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (dst / "classes.txt").write_text("".join(f"{c} x{c}\n" for c in range(1, 5)))
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--dataset",
                "cub200",
                "--data-root",
                str(tmp_path),
                "--image-size",
                "96",
                "--json",
                str(out),
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 12 and metrics["num_classes"] == 2


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "--dataset", "cub200", "--data-root", str(tmp_path / "nowhere"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_unavailable_download_says_how_to_provide_weights(tmp_path, monkeypatch, capsys):
    import torch.hub

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    code = main(["eval", "--dataset", "digits", "--backbone", "googlenet", "--no-progress"])
    assert code == 2
    assert "--weights" in capsys.readouterr().err


def test_train_rejects_unknown_keys_before_work(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--set", "train.epoch=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epoch'" in err and "train.epochs" in err
    assert not (tmp_path / "run").exists()


def _write_folder(folder, n=6, size=40):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        image = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / ("sub" if i % 2 else ".") / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_index_and_search_find_the_query_itself(tmp_path, capsys):
    paths = _write_folder(tmp_path / "photos")
    index = tmp_path / "index.safetensors"
    assert (
        main(
            [
                "index",
                str(tmp_path / "photos"),
                "--out",
                str(index),
                "--image-size",
                "64",
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    argv = ["search", str(paths[3]), "--index", str(index), "--top-k", "3", "--out", str(grid), "--include-self"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == str(paths[3])
    assert float(lines[0].split()[1]) == pytest.approx(1.0, abs=1e-4)
    assert Image.open(grid).size[0] > 100


def test_search_errors_are_clear(tmp_path, capsys):
    assert main(["search", str(tmp_path / "q.jpg"), "--index", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_eval_checkpoint_and_demo_json(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "demo",
                "--out",
                str(run),
                "--no-progress",
                "--set",
                "train.epochs=1",
                "--set",
                "train.max_steps_per_epoch=2",
                "--set",
                "data.image_size=32",
                "--set",
                "plm.num_proxies=20",
            ]
        )
        == 0
    )
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--dataset",
                "digits",
                "--checkpoint",
                str(run / "model.safetensors"),
                "--json",
                str(out),
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["embedding_dim"] == 128 and metrics["image_size"] == 32
    assert metrics["recall@1"] == pytest.approx(summary["final"]["recall@1"])
    demo_json = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--json",
            str(demo_json),
            "--no-progress",
            "--set",
            "train.epochs=1",
            "--set",
            "train.max_steps_per_epoch=1",
            "--set",
            "data.image_size=32",
            "--set",
            "plm.num_proxies=20",
        ]
    )
    result = json.loads(demo_json.read_text())
    assert code == (0 if result["recall@1_after"] > result["recall@1_before"] else 1)
    assert 0 <= result["recall@1_before"] <= 1 and 0 <= result["recall@1_after"] <= 1


@pytest.mark.slow
def test_train_method_none_reports_the_start(tmp_path, capsys):
    run = tmp_path / "none"
    args = ["train", "--config", "demo", "--out", str(run), "--no-progress", "--method", "none"]
    assert main([*args, "--set", "data.image_size=32", "--set", "plm.num_proxies=20"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"] == summary["start"] and summary["epochs"] == 0
    assert (run / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- run folders


def _folder_run(tmp_path, *extra: str) -> list[str]:
    from image_trees import make_tree

    root = tmp_path / "data"
    if not root.exists():
        make_tree("images", root, classes=4, per_class=10, bad=0)
    small = ["data.image_size=32", "model.embedding_dim=16", "plm.num_proxies=6", "train.batch_size=10"]
    small += ["data.num_workers=0", "train.epochs=2", "train.device=cpu"]
    small.append("train.min_steps=40")  # 20 steps an epoch, not the preset's 300 steps: a quick run
    return ["train", "--images", str(root), "--no-progress", *[f"--set={s}" for s in small], *extra]


def _log_epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_never_replaces_a_run_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_folder_run(tmp_path, "--out", str(run))) == 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(_folder_run(tmp_path, "--out", str(run))) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (epoch 2 logged)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert main(_folder_run(tmp_path, "--out", str(run), "--resume", "--overwrite")) == 2
    assert main(_folder_run(tmp_path, "--out", str(run), "--overwrite")) == 0
    assert _log_epochs(run) == [1, 2]


@pytest.mark.slow
def test_resume_alone_reads_the_runs_config_and_extends_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_folder_run(tmp_path, "--out", str(run), "--stop-after", "1")) == 0
    assert _log_epochs(run) == [1]
    # the README's resume line: nothing but --out and --resume (the data root comes from the run's config)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert _log_epochs(run) == [1, 2]
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "train.epochs=3"]) == 0
    assert _log_epochs(run) == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--set", "plm.n_alpha=3"]) == 2
    assert "plm.n_alpha: 5.0 -> 3" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--set", "train.epochs=2"]) == 2
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert _log_epochs(run) == [1, 2, 3]


def test_the_folder_fit_caps_proxies_and_leaves_what_the_user_set(tmp_path, capsys):
    from image_trees import make_tree

    from plmetric.cli.commands.train import FOLDER_PRESET, fit_preset_to_folder
    from plmetric.config.schema import load_config

    root, _ = make_tree("images", tmp_path / "data", classes=4, per_class=10, bad=0)
    cfg = load_config(FOLDER_PRESET, ["plm.num_proxies=300", "train.batch_size=120"])
    fit_preset_to_folder(cfg, root, [])
    assert (cfg.plm.num_proxies, cfg.train.batch_size, cfg.model.embedding_dim, cfg.train.select_k) == (10, 40, 40, 10)
    assert "plm.num_proxies=10" in capsys.readouterr().out
    cfg = load_config(FOLDER_PRESET, ["plm.num_proxies=300", "model.embedding_dim=64"])
    fit_preset_to_folder(cfg, root, ["plm.num_proxies=300", "model.embedding_dim=64"])  # given with --set
    assert (cfg.plm.num_proxies, cfg.model.embedding_dim, cfg.train.batch_size) == (300, 64, 40)


@pytest.mark.slow
def test_folder_preset_fits_the_folder_and_names_the_model_and_the_next_command(tmp_path, capsys):
    """``train --images`` without --config takes the preset folder, fits its sizes to the 40 images
    (batch, proxies ≤ n/4, embedding ≤ n) unless set, and ends with the picked model and the index line."""
    from image_trees import make_tree

    from plmetric.config.schema import load_config

    root = tmp_path / "data"
    make_tree("images", root, classes=4, per_class=10, bad=0)
    run = tmp_path / "run"
    small = ["data.image_size=32", "data.num_workers=0", "train.epochs=2", "train.device=cpu", "train.warmup_epochs=0"]
    small.append("train.select=mutual_knn")  # the preset keeps the last epoch; the label-free pick on request
    small.append("train.min_steps=10")  # 5 steps an epoch, not the preset's 300 steps: a quick run
    args = ["train", "--images", str(root), "--out", str(run), "--no-progress", *[f"--set={s}" for s in small]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "preset folder for 40 images, fitted: " in out
    assert "train.batch_size=40" in out and "model.embedding_dim=40" in out
    cfg = load_config(run / "config.yaml")
    assert (cfg.model.backbone, cfg.train.batch_size, cfg.model.embedding_dim) == ("efficientnet_lite0", 40, 40)
    assert (cfg.plm.num_proxies, cfg.plm.target_space) == (0, "embedding")  # the pile recipe: no proxies
    summary = json.loads((run / "summary.json").read_text())
    assert summary["select_rule"] == "mutual_knn" and summary["selected_epoch"] in (0, 1, 2)
    assert set(summary["final_selection"]) >= {"mutual_knn", "start_agreement"}
    assert (run / "selected.safetensors").is_file()
    lines = out.splitlines()
    picked = [line for line in lines if "selected.safetensors" in line and not line.startswith("next:")]
    assert len(picked) == 1
    if summary["selected_epoch"] == 0:
        assert "did not improve the label-free criterion mutual_knn" in picked[0]
    else:
        assert f"epoch {summary['selected_epoch']} of 2, picked without labels by mutual_knn" in picked[0]
    assert f"next:  plmetric index {root} --checkpoint {run / 'selected.safetensors'} --out" in out
    # a size the user set is left alone, and one that cannot work fails before any image is decoded
    capsys.readouterr()
    assert main([*args[:4], str(tmp_path / "run2"), *args[5:], "--set", "plm.num_proxies=41"]) == 2
    err = capsys.readouterr().err
    assert "plm.num_proxies (41) exceeds the number of training images (40)" in err
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_unreadable_images_are_named_once_in_plain_words(tmp_path):
    """A real process with 2 DataLoader workers and a PCA pass (two full passes over the images):
    each unreadable file is warned about exactly once, as a plain path on one line."""
    import subprocess
    import sys

    from image_trees import make_tree

    root, bad = make_tree("images", tmp_path / "data", classes=4, per_class=10, bad=3)
    args = _folder_run(tmp_path, "--out", str(tmp_path / "run"))
    args[2] = str(root)
    args += ["--set", "data.num_workers=2", "--set", "model.embedding_init=pca"]
    done = subprocess.run(
        [sys.executable, "-m", "plmetric.cli", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "skipping unreadable image" in line]
    assert sorted(line.split("skipping unreadable image ")[1].split(" (")[0] for line in warned) == sorted(
        map(str, bad)
    )
    assert all(line.startswith("plmetric: warning: ") for line in warned), warned
    assert "np.str_" not in done.stderr and "Traceback" not in done.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert sorted(summary["skipped_images"]) == sorted(map(str, bad))
    assert "left out 3 unreadable training image(s)" in done.stdout


def test_the_folder_fit_counts_only_readable_images_and_names_a_pile_too_small(tmp_path, capsys):
    from image_trees import make_tree

    from plmetric.cli.commands.train import FOLDER_PRESET, fit_preset_to_folder, minimum_images
    from plmetric.config.schema import load_config

    root, _ = make_tree("images", tmp_path / "data", classes=2, per_class=4, bad=0)
    for i in range(4):  # 8 readable images and 4 files that are not images
        (root / f"broken{i}.jpg").write_bytes(b"" if i % 2 else b"not an image\n")
    cfg = load_config(FOLDER_PRESET, ["plm.num_proxies=300"])
    fit_preset_to_folder(cfg, root, [])
    assert (cfg.plm.num_proxies, cfg.train.batch_size, cfg.model.embedding_dim, cfg.train.select_k) == (2, 5, 8, 7)
    assert "preset folder for 8 images (4 unreadable file(s) left out)" in capsys.readouterr().out

    small = tmp_path / "small"
    small.mkdir()
    images = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("broken")]
    for i, path in enumerate(images[:3]):
        path.rename(small / f"p{i}{path.suffix}")
    (small / "broken.jpg").write_text("not an image\n")
    cfg = load_config(FOLDER_PRESET)
    assert minimum_images(cfg) == 5
    too_small = r"small: 3 readable image\(s\) \(1 of 4 files unreadable\); training needs at least 5"
    with pytest.raises(ValueError, match=too_small):
        fit_preset_to_folder(cfg, small, [])
    # neighbours_per_seed given smaller: the pieces' dimension bounds the pile (embedding > plm.m)
    cfg = load_config(FOLDER_PRESET, ["train.neighbours_per_seed=2", "train.batch_size=2"])
    assert minimum_images(cfg) == cfg.plm.m + 1 == 3
    fit_preset_to_folder(cfg, small, ["train.neighbours_per_seed=2", "train.batch_size=2"])
    assert (cfg.model.embedding_dim, cfg.train.batch_size) == (3, 2)


def _search_report(tmp_path, capsys, query, index, *extra):
    """``search`` of one query with --json, --csv and a grid: (printed paths, JSON results, CSV rows)."""
    import csv

    for name in ("r.json", "r.csv", "g.png"):
        (tmp_path / name).unlink(missing_ok=True)
    capsys.readouterr()
    argv = ["search", str(query), "--index", str(index), "--json", str(tmp_path / "r.json")]
    argv += ["--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "g.png"), *extra]
    assert main(argv) == 0
    printed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line[:3].strip().isdigit()]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert (tmp_path / "g.png").is_file()
    (results,) = [q["results"] for q in report["queries"]]
    assert [r["path"] for r in results] == printed == [row["path"] for row in rows]
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    return printed, results, report


def test_search_leaves_out_the_query_itself_but_never_an_identical_copy(tmp_path, capsys):
    """A query that is an indexed image is left out of its own results (by its path, not its score: an
    identical copy of it stays, first, score 1) and --top-k others still come back; --include-self keeps
    it; a query outside the index loses nothing."""
    import torch

    from plmetric.core.checkpoint import save_model
    from plmetric.data.backbones import create_model

    paths = _write_folder(tmp_path / "photos")
    twin = tmp_path / "photos" / "twin_of_img3.png"
    twin.write_bytes(paths[3].read_bytes())
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    ckpt = save_model(tmp_path / "model.safetensors", model, meta)
    index = tmp_path / "index.safetensors"
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    assert main(["index", str(tmp_path / "photos"), "--checkpoint", str(ckpt), "--out", str(index), *small]) == 0
    query, copy = str(paths[3].resolve()), str(twin.resolve())
    # the same 16-d float32 unit embedding twice: its cosine with itself is 1 within 16 roundings of 2^-24
    tolerance = 1e-5

    printed, results, report = _search_report(tmp_path, capsys, paths[3], index, "--top-k", "3")
    assert len(printed) == 3 and query not in printed and report["include_self"] is False
    assert printed[0] == copy and abs(results[0]["score"] - 1) < tolerance
    printed, results, _ = _search_report(tmp_path, capsys, twin, index, "--top-k", "3")
    assert len(printed) == 3 and copy not in printed and printed[0] == query
    # --include-self: the old behaviour, the query among its own results (tied at score 1 with its copy)
    printed, results, report = _search_report(tmp_path, capsys, paths[3], index, "--top-k", "3", "--include-self")
    assert len(printed) == 3 and set(printed[:2]) == {query, copy} and report["include_self"] is True
    # more than the others: all the others (6), no padding; with itself all 7
    printed, _, _ = _search_report(tmp_path, capsys, paths[3], index, "--top-k", "50")
    assert sorted(printed) == sorted(str(p.resolve()) for p in [*paths, twin] if p != paths[3])
    printed, _, _ = _search_report(tmp_path, capsys, paths[3], index, "--top-k", "50", "--include-self")
    assert len(printed) == 7
    # a query outside the index (the same bytes elsewhere) is nobody's self: both indexed copies come back
    outside = tmp_path / "query.png"
    outside.write_bytes(paths[3].read_bytes())
    printed, _, _ = _search_report(tmp_path, capsys, outside, index, "--top-k", "2")
    assert set(printed) == {query, copy}
