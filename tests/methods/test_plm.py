"""Tests of plmetric.methods.plm: the PLM objective (gradient routing, options, dtypes, proxies)
and the method in the trainer's interface."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_within, qr_orthonormality

from plmetric.methods.losses import point_loss
from plmetric.methods.base import StepInputs
from plmetric.methods.plm import PLMLoss


def clustered(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(b // 5, d, generator=g), dim=1)
    x = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(b, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_gradient_routing_of_plm_loss() -> None:
    student = clustered(40, 16, 0).requires_grad_()
    teacher = clustered(40, 16, 0).add(0.01).requires_grad_()  # a leaf that must stay untouched
    criterion = PLMLoss(16, num_proxies=12)
    criterion.proxies.init_from_embeddings(clustered(60, 16, 1))
    terms = criterion.terms(student, teacher)
    proxies = criterion.proxies
    inputs = [student, teacher, proxies.locations, proxies.raw_bases]

    def grads(name: str) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(terms[name], inputs, retain_graph=True, allow_unused=True))

    for name in ("loss_point", "loss_proxy"):
        g_student, g_teacher, g_loc, g_bases = grads(name)
        assert g_student is not None and g_student.abs().sum() > 0, name
        assert g_teacher is None and g_loc is None and g_bases is None, name
    g_student, g_teacher, g_loc, g_bases = grads("loss_neighbourhood")
    assert g_student is None and g_teacher is None
    assert g_loc is not None and g_loc.abs().sum() > 0
    assert g_bases is not None and g_bases.abs().sum() > 0
    terms["loss"].backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and torch.isfinite(proxies.raw_bases.grad).all()


def test_duplicate_and_zero_embeddings_give_finite_gradients() -> None:
    student = torch.cat([torch.randn(6, 8), torch.zeros(3, 8)])
    student = torch.cat([student, student[:4]]).requires_grad_()  # copies and coincident zeros
    teacher = torch.cat([torch.randn(9, 8), torch.randn(4, 8)])
    teacher[9:] = teacher[:4]
    criterion = PLMLoss(8, num_proxies=5)
    with torch.no_grad():
        criterion.proxies.locations[0] = student[0]  # a proxy on a student embedding
    terms = criterion.terms(student, teacher)
    terms["loss"].backward()
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.isfinite(student.grad).all()
    assert torch.isfinite(criterion.proxies.locations.grad).all()
    assert torch.isfinite(criterion.proxies.raw_bases.grad).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_embeddings_raise(bad: float) -> None:
    good = torch.randn(20, 8)
    broken = good.clone()
    broken[2, 3] = bad
    criterion = PLMLoss(8, num_proxies=4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        criterion.terms(broken, good)
    with pytest.raises(ValueError, match="NaN or infinite"):
        criterion.terms(good, broken)
    with pytest.raises(ValueError, match="NaN or infinite"):
        point_loss(broken, torch.ones(20, 20))


def test_shape_and_option_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        PLMLoss(8, num_proxies=2).terms(torch.randn(10, 8), torch.randn(11, 8))
    with pytest.raises(ValueError, match="symmetrize"):
        PLMLoss(8, symmetrize="median")
    with pytest.raises(ValueError, match="num_proxies"):
        PLMLoss(8, num_proxies=-1)


def test_without_proxies_only_the_point_term_remains() -> None:
    student, teacher = clustered(30, 8, 4).requires_grad_(), clustered(30, 8, 5)
    criterion = PLMLoss(8, num_proxies=0, weight_point=2.0)
    assert criterion.proxies is None and len(list(criterion.parameters())) == 0
    terms = criterion.terms(student, teacher)
    assert "loss_proxy" not in terms and "loss_neighbourhood" not in terms  # switched off: not reported
    assert terms["loss"].item() == 2.0 * terms["loss_point"].item()  # 2·L (+ 0·Σ student): exact
    terms["loss"].backward()
    assert student.grad.abs().sum() > 0
    criterion.after_step()  # no proxies: nothing to do, no error


@pytest.mark.parametrize(
    "options",
    [
        {"binary": True, "symmetrize": "max"},
        {"subset_selection": False},
        {"m": 1, "tau": 1.0},
        {"loss_form": "contrastive"},
        {"loss_form": "contrastive", "delta_mode": "batch"},
        {"normalize_rows": True},
    ],
)
def test_plm_loss_options_run(options: dict) -> None:
    student, teacher = clustered(30, 8, 6).requires_grad_(), clustered(30, 8, 7)
    terms = PLMLoss(8, num_proxies=10, **options).terms(student, teacher)
    terms["loss"].backward()
    assert torch.isfinite(student.grad).all()
    assert 2 <= terms["piece_size"].item() <= 10


def test_after_step_keeps_the_proxy_bases() -> None:
    criterion = PLMLoss(8, num_proxies=6)
    with torch.no_grad():
        criterion.proxies.raw_bases.mul_(3.0).add_(0.1)
    before = criterion.proxies.bases.detach().clone()
    criterion.after_step()
    # float32 QR of an (orthonormal) basis returns it up to qr_orthonormality (d = 8, m = 2), as
    # in test_manifold's test_proxy_bases_are_orthonormal_and_differentiable
    bound = qr_orthonormality(8, 2, torch.float32)
    assert_within(criterion.proxies.bases.detach(), before, bound, "bases after after_step")
    assert_within(criterion.proxies.raw_bases.detach(), before, bound, "raw bases after after_step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plm_loss_follows_dtype(dtype: torch.dtype) -> None:
    student = clustered(25, 8, 8).to(dtype).requires_grad_()
    teacher = clustered(25, 8, 9).to(dtype)
    criterion = PLMLoss(8, num_proxies=7).to(dtype)
    terms = criterion.terms(student, teacher)
    assert terms["loss"].dtype == dtype
    terms["loss"].backward()
    assert student.grad.dtype == dtype


def test_one_call_shape_step_inputs_give_the_terms() -> None:
    """The trainer's call ``objective(StepInputs)`` is :meth:`PLMLoss.terms` of the first heads."""
    student, teacher = clustered(30, 8, 10), clustered(30, 8, 11)
    torch.manual_seed(0)
    a = PLMLoss(8, num_proxies=5)
    torch.manual_seed(0)
    b = PLMLoss(8, num_proxies=5)
    via_inputs = a(StepInputs((student,), (teacher,), None))
    direct = b.terms(student, teacher)
    assert via_inputs.keys() == direct.keys()
    for key in direct:
        assert torch.equal(via_inputs[key], direct[key]), key


def test_neighbourhood_pair_scope_regresses_inside_and_only_pushes_across() -> None:
    """With groups, pairs inside a group are regressed, pairs across pay only when too close."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    student = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    s = torch.rand(12, 12, generator=g, dtype=torch.float64)
    s = 0.5 * (s + s.T)
    groups = torch.arange(12) // 4
    got = point_loss(student, s, 1.0, groups=groups)
    x, t = student.numpy(), 1.0 - s.numpy()
    total = 0.0
    for i in range(12):
        for j in range(12):
            if i != j:
                d = np.linalg.norm(x[i] - x[j])
                e = t[i, j] - d
                total += e * e if i // 4 == j // 4 else max(e, 0.0) ** 2
    assert abs(got.item() - total / (12 * 11)) <= 1e-12
    assert got < point_loss(student, s, 1.0)  # across-group pairs farther than their target are free


def test_pair_scope_and_target_space_in_the_objective() -> None:
    student, teacher = clustered(30, 8, 12).requires_grad_(), clustered(30, 8, 13)
    local = PLMLoss(8, num_proxies=4, pair_scope="neighbourhood", group_size=5).terms(student, teacher)
    local["loss"].backward()
    assert torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="group_size"):
        PLMLoss(8, pair_scope="neighbourhood")
    features = clustered(30, 20, 14)
    from plmetric.manifold.pieces import plm_similarity

    on_features = PLMLoss(8, num_proxies=0, target_space="features")
    terms = on_features(StepInputs((student,), (teacher, features)))
    # the targets are the features' manifold similarity, not the embedding's
    torch.testing.assert_close(on_features.last_similarity, plm_similarity(features), rtol=0, atol=0)
    assert torch.equal(terms["loss_point"], on_features.terms(student, teacher, features)["loss_point"])
    on_embedding = PLMLoss(8, num_proxies=0)
    assert not torch.equal(terms["loss_point"], on_embedding(StepInputs((student,), (teacher, features)))["loss_point"])


@pytest.mark.parametrize("space,weight", [("blend", 0.3), ("anneal", 0.25), ("features", 0.0), ("embedding", 1.0)])
def test_blended_and_annealed_targets_mix_the_two_similarities(space: str, weight: float) -> None:
    """``s = (1 - λ) s_features + λ s_embedding``: λ = target_blend (blend), the progress (anneal)."""
    from plmetric.manifold.pieces import plm_similarity

    student = clustered(30, 8, 15).double().requires_grad_()
    teacher, features = clustered(30, 8, 16).double(), clustered(30, 20, 17).double()
    criterion = PLMLoss(8, num_proxies=0, target_space=space, target_blend=0.3)
    criterion(StepInputs((student,), (teacher, features), progress=0.25))
    s_features, s_embedding = plm_similarity(features).numpy(), plm_similarity(teacher).numpy()
    reference = (1 - weight) * s_features + weight * s_embedding  # NumPy float64
    # torch.lerp (a + λ(b - a)) and the reference ((1 - λ)a + λb) each round three operations on
    # values in [0, 1] (a difference, a product, a sum): 3u each, 6u apart at most
    assert_within(criterion.last_similarity, reference, 6 * torch.finfo(torch.float64).eps / 2, "mixed targets")


def test_anneal_weight_follows_the_progress() -> None:
    criterion = PLMLoss(8, num_proxies=0, target_space="anneal")
    assert [criterion.embedding_weight(p) for p in (None, -0.1, 0.0, 0.4, 1.0, 1.5)] == [0.0, 0.0, 0.0, 0.4, 1.0, 1.0]
    assert PLMLoss(8, num_proxies=0, target_space="blend", target_blend=0.7).embedding_weight(0.1) == 0.7
    with pytest.raises(ValueError, match="target_blend"):
        PLMLoss(8, target_space="blend", target_blend=1.5)
    with pytest.raises(ValueError, match="teacher_features"):
        criterion.terms(clustered(30, 8, 1), clustered(30, 8, 2), None, 0.5)


@pytest.mark.parametrize(
    "space,proxies,fitted",
    [("features", 0, ["features"]), ("embedding", 0, ["embedding"]), ("features", 4, ["embedding", "features"]),
     ("blend", 0, ["embedding", "features"])],
)
def test_only_the_pieces_that_are_used_are_fitted(monkeypatch, space: str, proxies: int, fitted: list[str]) -> None:
    import plmetric.methods.plm as plm_module

    calls = []
    original = plm_module.fit_pieces

    def counting(x, *args, **kwargs):
        calls.append("features" if x.shape[1] == 20 else "embedding")
        return original(x, *args, **kwargs)

    monkeypatch.setattr(plm_module, "fit_pieces", counting)
    student, teacher, features = clustered(30, 8, 18).requires_grad_(), clustered(30, 8, 19), clustered(30, 20, 20)
    PLMLoss(8, num_proxies=proxies, target_space=space)(StepInputs((student,), (teacher, features), progress=0.5))
    assert calls == fitted


def test_the_trainer_tells_the_objective_its_progress(tmp_path, monkeypatch) -> None:
    from tiny import tiny_config, tiny_model, tiny_splits

    from plmetric.training.loop import train

    seen: list[float | None] = []
    original = PLMLoss.embedding_weight

    def recording(self, progress):
        seen.append(progress)
        return original(self, progress)

    monkeypatch.setattr(PLMLoss, "embedding_weight", recording)
    cfg = tiny_config(train__epochs=2, plm__target_space="anneal", plm__num_proxies=0)
    train(cfg, tmp_path, splits=tiny_splits(), model=tiny_model(), progress=False)
    assert seen[0] == 0.0 and all(0.0 <= p < 1.0 for p in seen)
    assert all(a < b for a, b in zip(seen, seen[1:], strict=False)), "progress grows every step"
    assert seen[-1] >= 0.5  # the second of two epochs


@pytest.mark.parametrize(
    "overrides",
    [
        {"plm__target_space": "features"},
        {"plm__pair_scope": "neighbourhood"},
        {"plm__target_space": "anneal", "plm__neighbourhoods": "mutual"},
    ],
)
def test_the_levers_train(tmp_path, overrides) -> None:
    from tiny import tiny_config, tiny_model, tiny_splits

    from plmetric.training.loop import train

    cfg = tiny_config(train__epochs=1, **overrides)
    result = train(cfg, tmp_path, splits=tiny_splits(), model=tiny_model(), progress=False)
    assert result.final_metrics is not None


def test_terms_of_weight_zero_are_left_out_and_do_not_reach_the_loss() -> None:
    student, teacher = clustered(30, 8, 4).requires_grad_(), clustered(30, 8, 5)
    torch.manual_seed(0)
    full = PLMLoss(8, num_proxies=4).terms(student, teacher)
    assert {"loss_point", "loss_proxy", "loss_neighbourhood"} <= set(full)
    torch.manual_seed(0)
    criterion = PLMLoss(8, num_proxies=4, weight_proxy=0.0)
    terms = criterion.terms(student, teacher)
    assert "loss_proxy" not in terms and {"loss_point", "loss_neighbourhood"} <= set(terms)
    expected = full["loss_point"] + full["loss_neighbourhood"]
    assert torch.equal(terms["loss"], expected)  # same seed, same proxies: the same two terms, summed in order
    torch.manual_seed(0)
    nothing = PLMLoss(8, num_proxies=0, weight_point=0.0).terms(student, teacher)
    assert set(k for k in nothing if k.startswith("loss")) == {"loss"} and nothing["loss"].item() == 0.0
    nothing["loss"].backward()  # every term off: still a graph (zero gradient)
    assert torch.equal(student.grad, torch.zeros_like(student))
