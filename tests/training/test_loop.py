"""Trainer: a full tiny run, exact resume, bad input, checkpoints, PCA initialisation, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.core.checkpoint import read_metadata
from plmetric.training.runs import load_training_state
from plmetric.training.loop import NonFiniteLossError, train

TESTS = Path(__file__).resolve().parents[1]


def run(out: Path, cfg=None, **kwargs):
    return train(cfg or tiny_config(), out, splits=tiny_splits(), model=tiny_model(), progress=False, **kwargs)


def test_full_run_writes_log_checkpoints_and_plots(tmp_path):
    result = run(tmp_path)
    for name in (
        "config.yaml",
        "log.jsonl",
        "state.pt",
        "model.safetensors",
        "best.safetensors",
        "losses.png",
        "recall.png",
        "summary.json",
    ):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for record in lines:
        for key in ("loss", "loss_point", "loss_proxy", "loss_neighbourhood", "recall@1", "images_per_second"):
            assert np.isfinite(record[key]), key
        assert set(record["lr"]) == {"backbone", "embedding", "proxies"}
    assert result.final_metrics["recall@1"] == lines[-1]["recall@1"]
    assert result.best_metrics["recall@1"] == max(r["recall@1"] for r in lines)
    meta = read_metadata(tmp_path / "model.safetensors")
    assert meta["config"]["train"]["epochs"] == 3 and meta["epoch"] == 3
    assert meta["embedding_dim"] == 16
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert json.loads(state["config_json"]) == tiny_config().to_dict()


def test_training_changes_the_student_and_the_teacher_follows(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(tiny_config(), tmp_path, splits=tiny_splits(), model=model, progress=False)
    after = load_file(str(tmp_path / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    teacher, student = state["teacher"], state["student"]
    # the teacher is an average: between its start and the student, never equal to the student
    key = "embedding.weight"
    assert not torch.equal(teacher[key], student[key])
    assert (teacher[key] - before[key]).norm() < (student[key] - before[key]).norm()


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path / "full")
    part = tmp_path / "part"
    first = run(part, stop_after_epochs=2)
    assert len(first.history) == 2 and first.final_metrics is None
    resumed = run(part, resume=True)
    assert len(resumed.history) == 3
    for a, b in zip(full.history, resumed.history, strict=True):
        for key in ("loss", "loss_point", "loss_proxy", "loss_neighbourhood", "recall@1", "map@r"):
            assert a[key] == b[key], (key, a["epoch"])
    assert full.final_metrics == resumed.final_metrics
    wa, wb = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_another_config_is_refused_before_work(tmp_path):
    run(tmp_path, stop_after_epochs=1)
    other = tiny_config(plm__n_alpha=4.0)
    with pytest.raises(ValueError, match="another config.*plm.n_alpha"):
        train(other, tmp_path, resume=True, splits=tiny_splits(), model=tiny_model(), progress=False)
    with pytest.raises(FileNotFoundError, match="state.pt"):
        run(tmp_path / "empty", resume=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train__batch_size": 12}, "divisible by train.neighbours_per_seed"),
        ({"model__embedding_dim": 2}, "must exceed plm.m"),
        ({"train__neighbours_per_seed": 50, "train__batch_size": 50}, "must not exceed the number of training images"),
        ({"plm__num_proxies": 500}, "num_proxies"),
    ],
)
def test_bad_settings_fail_clearly_before_training(tmp_path, overrides, message):
    cfg = tiny_config()
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path, splits=tiny_splits(), model=tiny_model(cfg.model.embedding_dim or 16), progress=False)
    assert not (tmp_path / "state.pt").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, stop_after_epochs=1)
    good = (tmp_path / "state.pt").read_bytes()
    from plmetric.methods.plm import PLMLoss

    original = PLMLoss.forward

    def poisoned(self, inputs):
        terms = original(self, inputs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(PLMLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        run(tmp_path, resume=True)
    assert (tmp_path / "state.pt").read_bytes() == good


def test_pca_init_keeps_retrieval_of_raw_features(tmp_path):
    cfg = tiny_config(model__embedding_init="pca", model__embedding_dim=20, train__epochs=1)
    result = train(cfg, tmp_path, splits=tiny_splits(), model=tiny_model(20), progress=False)
    assert result.start_metrics["recall@1"] >= 0.5


def test_load_training_state_is_weights_only(tmp_path):
    run(tmp_path, stop_after_epochs=1)
    state = load_training_state(tmp_path / "state.pt", tiny_config())
    assert state["epoch"] == 0


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """gloo, 2 CPU processes, the same global batches: the same losses and weights as 1 process."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(TESTS / "ddp_worker.py"), str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(TESTS / "ddp_worker.py"),
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one/log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two/log.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "loss_point", "loss_proxy", "loss_neighbourhood"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["recall@1"] == b["recall@1"]
    wa, wb = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    # evaluation gathered every test image exactly once (37 is odd: no padding duplicates)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["final"]["recall@1"] == one[-1]["recall@1"]


@pytest.mark.slow
def test_ddp_with_unreadable_images_matches_one_process(tmp_path):
    """Under DDP (gloo, 2 processes, each with 2 DataLoader workers) the unreadable images are found
    on whichever rank decodes them, left out on every rank, and the run matches one process."""
    from image_trees import make_tree

    root, bad = make_tree("images", tmp_path / "data", bad=3)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518"]
    for name, prefix in (("one", [sys.executable]), ("two", launcher)):
        done = subprocess.run(
            [*prefix, str(TESTS / "ddp_worker.py"), str(tmp_path / name), str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert sorted(summaries[0]["skipped_images"]) == sorted(summaries[1]["skipped_images"]) == sorted(map(str, bad))
    one, two = ([json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_unlabelled_training_skips_evaluation(tmp_path, capsys):
    splits = tiny_splits()
    splits.train.labels[:] = -1
    splits.test = None
    result = train(tiny_config(train__epochs=1), tmp_path, splits=splits, model=tiny_model(), progress=False)
    assert result.start_metrics is None and result.final_metrics is None and result.best_epoch is None
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "best.safetensors").exists()
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert "recall@1" not in record and np.isfinite(record["loss"])


def _nulls(value, where="summary"):
    """The paths of every None inside a JSON value."""
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [p for key, v in value.items() for p in _nulls(v, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nulls(v, f"{where}[{i}]")]
    return []


def _small_pile(tmp_path: Path, rule: str):
    """An unlabelled folder of 24 images, B = 10, k = 5 (one round of seeds: 12 batches) and the
    floor train.min_steps = 30 over 2 epochs (15 an epoch); the config and a function training it
    (the folder as ``train`` loads it, with a tiny transform: no backbone's, no timed probe)."""
    from image_trees import make_tree
    from torchvision import transforms

    from plmetric.data.datasets import load_dataset

    root, _ = make_tree("images", tmp_path / "pile", classes=3, per_class=8, bad=0)
    cfg = _tree_config("images", root, train__min_steps=30, train__select=rule, train__select_k=3)
    small = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])

    def train_pile(out: Path, **kwargs):
        splits = load_dataset("images", str(root), train_transform=small, test_transform=small, verbose=False)
        return train(cfg, out, splits=splits, model=tiny_model(), progress=False, **kwargs)

    return cfg, train_pile


def _timeless(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


@pytest.mark.parametrize("rule", ["mutual_knn", "final"])
def test_a_small_pile_gets_its_step_floor_and_a_summary_without_nulls(tmp_path, rule):
    """One round of seeds gives 12 batches, the floor asks 15 an epoch: the run performs exactly
    those (ceil(30 / 2) * 2), as the estimate planned. Its summary.json holds no field it cannot fill
    (no test metrics, no nulls) and selected_score is the criterion log.jsonl holds for the selected
    epoch."""
    from plmetric.training.cached import planned_steps_per_epoch

    cfg, train_pile = _small_pile(tmp_path, rule)
    out = tmp_path / "run"
    result = train_pile(out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["steps"] for record in log] == [15, 15]  # > 24 // 2 = 12: a second round of seeds
    assert torch.load(out / "state.pt", weights_only=True)["scheduler"]["last_epoch"] == 30
    assert planned_steps_per_epoch(cfg, 24) * cfg.train.epochs == 30  # every image readable: the same count
    summary = json.loads((out / "summary.json").read_text())
    assert _nulls(summary) == []
    assert not {"start", "final", "best", "best_epoch", "selected", "skipped_test_images"} & set(summary)
    assert summary["selected_criterion"] == "mutual_knn" and summary["select_rule"] == rule
    epoch = summary["selected_epoch"]
    logged = summary["selection_start"] if epoch == 0 else log[epoch - 1]["selection"]
    assert summary["selected_score"] == logged["mutual_knn"] == result.selected_score
    if rule == "final":
        assert epoch == 2 and summary["selected_score"] == summary["change"]["kept"]


@pytest.mark.slow
def test_a_small_pile_resumes_its_drawn_again_seeds_exactly(tmp_path):
    """The seeds drawn again for the floor are a function of (seed, epoch): stopped after epoch 1
    and resumed, the run is the uninterrupted one."""
    _, train_pile = _small_pile(tmp_path, "mutual_knn")
    train_pile(tmp_path / "full")
    part = tmp_path / "part"
    train_pile(part, stop_after_epochs=1)
    train_pile(part, resume=True)
    full, resumed = ([json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in (tmp_path / "full", part))
    assert [r["steps"] for r in resumed] == [15, 15] and _timeless(resumed) == _timeless(full)
    wa, wb = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_label_correlation_matches_numpy_pearson():
    from plmetric.training.loop import label_correlation

    rng = np.random.default_rng(0)
    s = rng.random((9, 9))
    s = (s + s.T) / 2
    y = rng.integers(0, 3, 9)
    iu = np.triu_indices(9, 1)
    expected = np.corrcoef(s[iu], (y[:, None] == y[None, :])[iu].astype(float))[0, 1]
    got = label_correlation(torch.from_numpy(s), torch.from_numpy(y))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(label_correlation(torch.ones(4, 4), torch.tensor([0, 0, 1, 1]))) == 0.0


def test_diagnostics_are_logged_every_epoch(tmp_path):
    run(tmp_path, cfg=tiny_config(train__epochs=1))
    record = json.loads((tmp_path / "log.jsonl").read_text())
    for key in ("target_label_correlation", "target_mean", "distance_mean", "piece_size"):
        assert np.isfinite(record[key]), key
    assert -1.0 <= record["target_label_correlation"] <= 1.0
    assert 0.0 < record["target_mean"] <= 1.0 and 0.0 < record["distance_mean"] <= 2.0


def test_keep_teacher_evaluates_and_saves_the_moving_average(tmp_path):
    cfg = tiny_config(train__keep="teacher", train__epochs=2)
    run(tmp_path, cfg)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    saved = load_file(tmp_path / "model.safetensors")
    for name, value in state["teacher"].items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(state["teacher"][n], state["student"][n]) for n in state["student"])


def test_head_warmup_keeps_the_backbone_still_then_releases_it(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    cfg = tiny_config(train__head_warmup_epochs=1.0, train__epochs=1)
    train(cfg, tmp_path / "warm", splits=tiny_splits(), model=model, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.backbone.named_parameters())
    model2 = tiny_model()
    cfg2 = tiny_config(train__head_warmup_epochs=1.0, train__epochs=2)
    train(cfg2, tmp_path / "released", splits=tiny_splits(), model=model2, progress=False)
    assert any(not torch.equal(before[n], p) for n, p in model2.backbone.named_parameters())


def test_method_none_reports_the_untrained_start(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    result = train(tiny_config(train__method="none"), tmp_path, splits=tiny_splits(), model=model, progress=False)
    assert result.history == [] and result.final_metrics == result.start_metrics
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["recall@1"] == result.start_metrics["recall@1"]
    assert (tmp_path / "model.safetensors").is_file()


def test_contrastive_loss_form_trains(tmp_path):
    result = run(tmp_path, tiny_config(plm__loss_form="contrastive", train__epochs=2))
    assert len(result.history) == 2 and all(np.isfinite(r["loss"]) for r in result.history)


def test_head_only_training_on_cached_features(tmp_path):
    from plmetric.data.datasets import DatasetSplits, FeatureDataset
    from plmetric.data.backbones import feature_model

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 12))
    labels = np.repeat(np.arange(8), 10)
    features = centres[labels] + 0.3 * rng.normal(size=(80, 12))
    train_part = FeatureDataset(features[labels < 4], labels[labels < 4])
    splits = DatasetSplits("features", train_part, FeatureDataset(features[labels >= 4], labels[labels >= 4]))
    cfg = tiny_config(model__embedding_init="pca", model__embedding_dim=8, train__epochs=2)
    result = train(cfg, tmp_path, splits=splits, model=feature_model(12, 8), progress=False)
    assert result.start_metrics["recall@1"] > 0.9  # PCA of well-separated clusters keeps them apart
    assert len(result.history) == 2


class _RecordingTrunk(torch.nn.Module):
    """Records, per call, whether gradients were on (student) and whether the input was all zero."""

    calls: list[tuple[bool, bool]] = []

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        _RecordingTrunk.calls.append((torch.is_grad_enabled(), bool((x == 0).all())))
        return self.conv(x) + 1.0


@pytest.mark.parametrize("view", ["same", "clean"])
def test_teacher_view_feeds_the_teacher_its_own_images(tmp_path, view):
    from plmetric.data.backbones import EmbeddingModel

    splits = tiny_splits()
    splits.train.transform = lambda image: torch.zeros(3, 12, 12)  # the student's "augmentation": blank images
    _RecordingTrunk.calls = []
    model = EmbeddingModel("rec", _RecordingTrunk(), feature_dim=8, embedding_dim=4)
    cfg = tiny_config(train__teacher_view=view, train__epochs=1, model__embedding_dim=4)
    train(cfg, tmp_path, splits=splits, model=model, progress=False)
    student_calls = [zero for grad, zero in _RecordingTrunk.calls if grad]
    teacher_zero = [zero for grad, zero in _RecordingTrunk.calls if not grad]
    assert student_calls and all(student_calls)  # the student always saw its own (blank) view
    # "same": the teacher saw the blank student views too; "clean": only real images (steps, bank, evaluation)
    assert any(teacher_zero) == (view == "same")


def test_teacher_view_needs_images(tmp_path):
    from plmetric.data.datasets import DatasetSplits, FeatureDataset
    from plmetric.data.backbones import feature_model

    part = FeatureDataset(np.random.default_rng(0).normal(size=(20, 6)), np.repeat(np.arange(4), 5))
    with pytest.raises(ValueError, match="teacher_view"):
        train(
            tiny_config(train__teacher_view="clean", model__embedding_dim=4),
            tmp_path,
            splits=DatasetSplits("f", part, part),
            model=feature_model(6, 4),
            progress=False,
        )


def test_stml_method_trains_both_heads_and_saves_a_loadable_embedding(tmp_path):
    cfg = tiny_config(train__method="stml", train__epochs=2, stml__g_dim=12)
    model = tiny_model()
    result = train(cfg, tmp_path, splits=tiny_splits(), model=model, progress=False)
    record = result.history[-1]
    for key in ("loss", "loss_rc", "loss_kl", "target_label_correlation"):
        assert np.isfinite(record[key]), key
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["student"]["embedding_g.weight"].shape == (12, 24)  # the auxiliary head trained and resumable
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(name.startswith("embedding_g") for name in saved)
    loaded = tiny_model(seed=1)
    loaded.load_state_dict(saved)  # strict: exactly an EmbeddingModel's keys
    model.eval()
    x = torch.randn(3, 3, 12, 12)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_cached_pipeline_trains_deterministically(tmp_path):
    cfg = tiny_config(data__pipeline="cached", data__image_size=12, train__epochs=2)
    first = run(tmp_path / "a", cfg)
    second = run(tmp_path / "b", tiny_config(data__pipeline="cached", data__image_size=12, train__epochs=2))
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    assert all(np.isfinite(r["loss"]) for r in first.history)


def test_cached_pipeline_falls_back_to_streaming_over_its_size_guard(tmp_path):
    from plmetric.data.pipeline import CacheFallbackWarning

    cfg = tiny_config(data__pipeline="cached", data__image_size=12, data__cache_max_bytes="1000", train__epochs=1)
    with pytest.warns(CacheFallbackWarning, match="1,000"):
        result = run(tmp_path, cfg)
    assert np.isfinite(result.history[0]["loss"])


@pytest.mark.parametrize("view", ["clean", "other"])
def test_cached_pipeline_gives_the_teacher_its_own_view(tmp_path, view):
    cfg = tiny_config(data__pipeline="cached", data__image_size=12, train__epochs=1, train__teacher_view=view)
    result = run(tmp_path, cfg)
    assert np.isfinite(result.history[0]["loss"])


# ----------------------------------------------------------------------------- unreadable images


def _tree_config(layout: str, root: Path, **overrides):
    cfg = tiny_config(train__epochs=2, train__bank_refresh_every=1, **overrides)
    cfg.data.dataset, cfg.data.root, cfg.data.image_size = layout, str(root), 16
    return cfg


@pytest.mark.filterwarnings("ignore::plmetric.data.datasets.UnreadableImageWarning")
@pytest.mark.parametrize(
    "layout, pipeline, workers",
    [("cub200", "pil", 2), ("cars196", "pil", 0), ("sop", "pil", 2), ("images", "pil", 2), ("folder", "cached", 0)],
)
def test_unreadable_images_are_left_out_and_named_in_the_summary(tmp_path, layout, pipeline, workers):
    """A zero-byte .jpg, a truncated JPEG and a text file named .jpg among the training images of
    every loader: the run trains on the rest, lists them in summary.json and keeps them out of the
    bank (``tests/cli/test_cli.py`` checks the warnings a user sees)."""
    from image_trees import make_tree

    root, bad = make_tree(layout, tmp_path / "data")
    cfg = _tree_config(layout, root, data__pipeline=pipeline, data__num_workers=workers)
    result = train(cfg, tmp_path / "run", model=tiny_model(), progress=False)
    bad_names = sorted(str(p) for p in bad)
    assert sorted(result.skipped_images) == bad_names
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert sorted(summary["skipped_images"]) == bad_names
    assert summary.get("skipped_test_images") == (None if layout == "images" else [])  # a pile has no test split
    state = torch.load(tmp_path / "run/state.pt", weights_only=True)
    from plmetric.data.datasets import load_dataset

    splits_paths = [str(p) for p in load_dataset(layout, str(root), verbose=False).train.paths]
    filled = state["bank"]["filled"]
    bad_rows = [splits_paths.index(p) for p in bad_names]
    assert not filled[bad_rows].any() and int(filled.sum()) == len(splits_paths) - len(bad)
    assert (tmp_path / "run/model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore::plmetric.data.datasets.UnreadableImageWarning")
def test_sampler_never_yields_unreadable_items(tmp_path):
    """The batches of a run with unreadable images hold readable items only."""
    from image_trees import make_tree

    from plmetric.training import sampling
    root, bad = make_tree("images", tmp_path / "data", bad=3)
    seen: list[int] = []
    original = sampling.NeighbourhoodBatchSampler.__iter__

    def recording_iter(self):
        for batch in original(self):
            seen.extend(batch)
            yield batch

    sampling.NeighbourhoodBatchSampler.__iter__ = recording_iter
    try:
        train(_tree_config("images", root), tmp_path / "run", model=tiny_model(), progress=False)
    finally:
        sampling.NeighbourhoodBatchSampler.__iter__ = original
    from plmetric.data.datasets import load_dataset

    paths = [str(p) for p in load_dataset("images", str(root), verbose=False).train.paths]
    bad_rows = {paths.index(str(p)) for p in bad}
    assert seen and not bad_rows & set(seen)


@pytest.mark.filterwarnings("ignore::plmetric.data.datasets.UnreadableImageWarning")
def test_too_few_readable_images_is_a_clear_error(tmp_path):
    from image_trees import make_tree

    root, _ = make_tree("images", tmp_path / "data", classes=2, per_class=7, bad=5)
    with pytest.raises(ValueError, match=r"only 9 of 14 training images are readable"):
        train(_tree_config("images", root), tmp_path / "run", model=tiny_model(), progress=False)


def test_training_on_cached_views_gives_the_teacher_the_clean_view(tmp_path, monkeypatch):
    """A ViewFeatureDataset pairs a random augmented view (student) with the clean one (teacher);
    the bank and the evaluation see the clean views."""
    from plmetric.data.datasets import DatasetSplits, ViewFeatureDataset
    from plmetric.data.backbones import feature_model

    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(8), 10)
    clean = torch.nn.functional.normalize(torch.randn(8, 24, generator=g), dim=1)[labels] * 3
    clean = clean + 0.3 * torch.randn(80, 24, generator=g)
    views = torch.stack([clean, *(clean + 0.2 * torch.randn(80, 24, generator=g) for _ in range(3))])
    train_views = ViewFeatureDataset(views[:, :40], labels[:40], name="train")
    test_views = ViewFeatureDataset(views[:1, 40:], labels[40:], name="test")
    seen = []
    from plmetric.training.loop import TrainStep

    original = TrainStep.__call__

    def spy(self, student_images, teacher_images, index, labels=None, progress=None):
        seen.append((student_images.clone(), teacher_images.clone(), index.clone()))
        return original(self, student_images, teacher_images, index, labels, progress)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    cfg = tiny_config(train__epochs=2, train__teacher_view="same")
    result = train(
        cfg,
        tmp_path,
        splits=DatasetSplits("views", train_views, test_views),
        model=feature_model(24, 16),
        progress=False,
    )
    assert result.final_metrics is not None and seen
    for student, teacher, index in seen:
        assert torch.equal(teacher, views[0, index])  # the teacher always gets the clean view
        assert not torch.equal(student, teacher)  # the student an augmented one


def test_the_epoch_line_and_the_log_show_only_the_terms_that_are_on(tmp_path, capsys):
    cfg = tiny_config(plm__num_proxies=0, train__epochs=1)
    result = run(tmp_path / "run", cfg)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1:")]
    assert len(line) == 1 and "loss_point" in line[0] and " loss " in line[0]
    assert "loss_proxy" not in line[0] and "loss_neighbourhood" not in line[0]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert {k for k in record if k.startswith("loss")} == {"loss", "loss_point"}
    assert record["loss"] == pytest.approx(record["loss_point"], rel=1e-6)  # weight_point 1: the one term
    assert (tmp_path / "run" / "losses.png").is_file() and result.history[0]["loss"] == record["loss"]
