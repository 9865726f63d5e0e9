"""Tests of plmetric.methods.stml (and its terms in plmetric.methods.losses): STML's loss against loop ports of the
authors' code, gradient routing, the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import (
    assert_stable_topk,
    assert_within,
    distance_error,
    function_error,
    gamma,
    qr_orthonormality,
    stml_similarity_error,
    u,
)
from tiny import tiny_model

from plmetric.evaluation.estimators import stml_similarity
from plmetric.methods.losses import stml_kl_loss, stml_rc_loss
from plmetric.methods.stml import STMLLoss, STMLModel
from plmetric.training.sampling import ema_update, make_teacher

# ------------------------------------------------------------------------------------------
# plain loop ports of the authors' RC_STML / KL_STML (github tjddus9597/STML-CVPR22, code/loss.py)
# ------------------------------------------------------------------------------------------


def _ref_normalize(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(len(x)):
        out[i] = x[i] / max(np.sqrt((x[i] ** 2).sum()), 1e-12)
    return out


def _ref_row_normalised_distances(x: np.ndarray) -> np.ndarray:
    """``S_dist = cdist(x, x); S_dist / S_dist.mean(1, keepdim=True)`` with explicit loops."""
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = np.sqrt(((x[i] - x[j]) ** 2).sum())
    for i in range(n):
        d[i] = d[i] / d[i].mean()
    return d


def _ref_similarity(t_emb: np.ndarray, sigma: float, topk: int) -> np.ndarray:
    """The teacher targets W of ``RC_STML.forward`` (one view per image: ``idx = arange(N)``)."""
    t = _ref_normalize(t_emb)
    n = len(t)
    w_p = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            w_p[i, j] = np.exp(-((t[i] - t[j]) ** 2).sum() / sigma)
    w_p_copy = w_p.copy()
    for i in range(n):  # W_P_copy[idx.unsqueeze(1) == idx.unsqueeze(1).t()] = 1
        w_p_copy[i, i] = 1.0
    topk_index = np.argsort(-w_p_copy, axis=1, kind="stable")[:, :topk]
    topk_half_index = topk_index[:, : int(np.around(topk / 2))]
    w_nn = np.zeros((n, n))
    for i in range(n):
        for j in topk_index[i]:
            w_nn[i, j] = 1.0
    v = ((w_nn + w_nn.T) / 2 == 1).astype(float)
    w_c_tilda = np.zeros((n, n))
    for i in range(n):
        ind_nonzero = np.where(v[i, :] != 0)[0]
        w_c_tilda[i, ind_nonzero] = (v[:, ind_nonzero].sum(1) / len(ind_nonzero))[ind_nonzero]
    w_c_hat = np.zeros((n, n))
    for i in range(n):
        w_c_hat[i] = w_c_tilda[topk_half_index[i]].mean(0)
    w_c = (w_c_hat + w_c_hat.T) / 2
    return (w_p + w_c) / 2


def _ref_rc(s_emb, t_emb, sigma, delta, topk, disable_mu):
    if disable_mu:
        s_emb = _ref_normalize(s_emb)
    n = len(s_emb)
    s_dist = _ref_row_normalised_distances(s_emb)
    w = _ref_similarity(t_emb, sigma, topk)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                pull = max(s_dist[i, j], 0.0) ** 2 * w[i, j]
                push = max(delta - s_dist[i, j], 0.0) ** 2 * (1 - w[i, j])
                total += pull + push
    return total / (n * (n - 1))


def _ref_kl(s_f, s_g, disable_mu, temperature=1.0):
    if disable_mu:
        s_f, s_g = _ref_normalize(s_f), _ref_normalize(s_g)
    n = len(s_f)
    d_f, d_g = _ref_row_normalised_distances(s_f), _ref_row_normalised_distances(s_g)
    total = 0.0
    for i in range(n):
        a, b = -d_f[i] / temperature, -d_g[i] / temperature
        log_q = a - (a.max() + np.log(np.exp(a - a.max()).sum()))
        log_p = b - (b.max() + np.log(np.exp(b - b.max()).sum()))
        for j in range(n):
            total += np.exp(log_p[j]) * (log_p[j] - log_q[j])
    return total * temperature**2 / n


def _ref_stml(s_f, s_g, t_g, sigma, delta, topk, disable_mu):
    rc = (_ref_rc(s_f, t_g, sigma, delta, topk, disable_mu) + _ref_rc(s_g, t_g, sigma, delta, topk, disable_mu)) / 2
    kl = _ref_kl(s_f, s_g, disable_mu)
    return rc + kl, rc, kl


# The authors' torch code, verbatim but for `.cuda()` and V kept in float64 (for the gradients).
def _theirs_rc(s_emb, t_emb, idx, sigma, delta, topk, disable_mu):
    if disable_mu:
        s_emb = F.normalize(s_emb)
    t_emb = F.normalize(t_emb)
    N = len(s_emb)
    S_dist = torch.cdist(s_emb, s_emb)
    S_dist = S_dist / S_dist.mean(1, keepdim=True)
    with torch.no_grad():
        T_dist = torch.cdist(t_emb, t_emb)
        W_P = torch.exp(-T_dist.pow(2) / sigma)
        W_P_copy = W_P.clone()
        W_P_copy[idx.unsqueeze(1) == idx.unsqueeze(1).t()] = 1
        topk_index = torch.topk(W_P_copy, topk)[1]
        topk_half_index = topk_index[:, : int(np.around(topk / 2))]
        W_NN = torch.zeros_like(W_P).scatter_(1, topk_index, torch.ones_like(W_P))
        V = ((W_NN + W_NN.t()) / 2 == 1).to(W_P.dtype)  # theirs: .float(), float32 rounding of 1/|R(i)|
        W_C_tilda = torch.zeros_like(W_P)
        for i in range(N):
            indNonzero = torch.where(V[i, :] != 0)[0]
            W_C_tilda[i, indNonzero] = (V[:, indNonzero].sum(1) / len(indNonzero))[indNonzero]
        W_C_hat = W_C_tilda[topk_half_index].mean(1)
        W_C = (W_C_hat + W_C_hat.t()) / 2
        W = (W_P + W_C) / 2
        identity_matrix = torch.eye(N, dtype=W.dtype)
        pos_weight = (W) * (1 - identity_matrix)
        neg_weight = (1 - W) * (1 - identity_matrix)
    pull_losses = torch.relu(S_dist).pow(2) * pos_weight
    push_losses = torch.relu(delta - S_dist).pow(2) * neg_weight
    return (pull_losses.sum() + push_losses.sum()) / (len(s_emb) * (len(s_emb) - 1))


def _theirs_kl(s_f, s_g, disable_mu):
    if disable_mu:
        s_f, s_g = F.normalize(s_f), F.normalize(s_g)
    S_dist = torch.cdist(s_f, s_f)
    S_dist = S_dist / S_dist.mean(1, keepdim=True)
    S_bg_dist = torch.cdist(s_g, s_g)
    S_bg_dist = S_bg_dist / S_bg_dist.mean(1, keepdim=True)
    log_q = F.log_softmax(-S_dist, dim=-1)
    p = F.softmax(-S_bg_dist.detach(), dim=-1)
    return F.kl_div(log_q, p, reduction="sum") / S_dist.size(0)


# ------------------------------------------------------------------------------------------
# error bounds of the loss terms (tests/numerics.py for the notation), all float64
# ------------------------------------------------------------------------------------------


def _normalised_distance_errors(x: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``d̂`` (the reference's) and the bound on ``|d̂_ours - d̂_exact|``, per entry.

    L2 normalisation moves each point by <= γ_{d+3} (norm, division; unit rows), so a distance
    by 2γ_{d+3}; the explicit-difference distance adds ``distance_error(d)`` relative; the row
    mean ``γ_{n+1}`` relative plus the mean of the distances' errors; the division u.
    """
    n, d = x.shape
    xn = _ref_normalize(x) if normalize else x
    dist = np.sqrt(((xn[:, None] - xn[None]) ** 2).sum(-1))
    dd = distance_error(d) * dist + (2 * gamma(d + 3) if normalize else 0.0)
    mean = dist.mean(axis=1, keepdims=True)
    dmean = dd.mean(axis=1, keepdims=True) + gamma(n + 1) * mean
    dhat = dist / mean
    return dhat, (dd + dhat * dmean) / mean + u() * dhat


def _rc_error(s_emb, t_emb, sigma, delta, topk, normalize) -> float:
    """Bound on ``|L_RC ours - reference|``: per pair, the pull ``W d̂²`` and push
    ``(1 - W) relu(δ - d̂)²`` with the errors of d̂ (``δd̂``, :func:`_normalised_distance_errors`)
    and W (``δW``, :func:`numerics.stml_similarity_error`): ``W (2 d̂ δd̂ + δd̂²) + (1 - W)(2 r δr + δr²) +
    δW |d̂² - r²| + 3u (d̂² + r²)`` with ``r = relu(δ - d̂)``, ``δr = δd̂ + u (δ + r)`` (relu is
    1-Lipschitz); both implementations; the sum of n(n - 1) terms and the division: γ_{N+1}."""
    n = len(s_emb)
    dhat, ddhat = _normalised_distance_errors(s_emb, normalize)
    w, dw = _ref_similarity(t_emb, sigma, topk), stml_similarity_error(t_emb, sigma, topk)
    r = np.maximum(delta - dhat, 0.0)
    dr = ddhat + u() * (delta + r)
    terms = w * dhat**2 + (1 - w) * r**2
    errors = (
        w * (2 * dhat * ddhat + ddhat**2)
        + (1 - w) * (2 * r * dr + dr**2)
        + dw * np.abs(dhat**2 - r**2)
        + 3 * u() * (dhat**2 + r**2)
    )
    off = ~np.eye(n, dtype=bool)
    return float(2 * errors[off].mean() + 2 * gamma(n * (n - 1) + 1) * terms[off].mean())


def _kl_error(s_f, s_g, normalize, temperature=1.0) -> float:
    """Bound on ``|L_KL ours - reference|``, ``L = T²/n Σ_ij P_ij (log P_ij - log Q_ij)``.

    ``a = -d̂/T`` carries ``δa = δd̂/T``; a log-softmax ``a_j - max - log Σ exp(a - max)`` adds
    ``max δa`` (the log-sum-exp is 1-Lipschitz in the ∞-norm) and its own rounding:
    n exp and a log (f each), a sum (γ_n), three subtractions, on values <= |a| + log n:
    ``δlog <= δa + max δa + (2f + γ_{n+3}) (|a| + |lse| + 1)``. A term ``P (log P - log Q)``
    then carries ``P (δlogP + δlogQ) + |log P - log Q| P (δlogP + f)`` (``P = exp(log P)``), and
    2u more for the product and the subtraction; both implementations; a sum of n² terms γ_{n²+2}.
    """
    n = len(s_f)

    def log_softmax_error(x):
        dhat, ddhat = _normalised_distance_errors(x, normalize)
        a, da = -dhat / temperature, ddhat / temperature
        lse = np.log(np.exp(a).sum(axis=1, keepdims=True))
        log_p = a - lse
        own = (2 * function_error() + gamma(n + 3)) * (np.abs(a) + np.abs(lse) + 1)
        return log_p, da + da.max(axis=1, keepdims=True) + own

    log_q, dlog_q = log_softmax_error(s_f)
    log_p, dlog_p = log_softmax_error(s_g)
    p = np.exp(log_p)
    gap = np.abs(log_p - log_q)
    errors = p * (dlog_p + dlog_q) + gap * p * (dlog_p + function_error()) + 2 * u() * p * gap
    terms = p * (log_p - log_q)
    return float(temperature**2 / n * (2 * errors.sum() + 2 * gamma(n * n + 2) * np.abs(terms).sum()))


def _gradient_errors(s_f, s_g, t_g, sigma, delta, topk, normalize) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on ``|∇ ours - ∇ theirs|`` for the two heads.

    The loss is a sum of pair terms ``T_k``; its gradient is ``Σ_k ∂T_k/∂x``, whose computed value
    is off by at most ``γ_K Σ_k |∂T_k/∂x|`` (Higham §3.1 for the sum; each contribution a chain of
    K rounded operations: forward 2d + n + 12 -- normalisation, distance, row mean, division,
    relu, square, weight, scaling -- the backward the same plus the sums over a row (n) and over a
    vector (d): ``K = 5d + 3n + 24``), plus the error of the weights ``δW`` times
    ``Σ_k |∂(d̂_k² - r_k²)/∂x|``. ``Σ_k |·|`` comes from autograd Jacobians of the term matrices;
    both implementations.
    """
    n = len(s_f)
    off = (~torch.eye(n, dtype=torch.bool)).double()
    w = torch.tensor(_ref_similarity(t_g.numpy(), sigma, topk))
    dw = float(stml_similarity_error(t_g.numpy(), sigma, topk).max())
    jac = torch.autograd.functional.jacobian

    def dhat(x):
        x = F.normalize(x, dim=1) if normalize else x
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        return dist / dist.mean(dim=1, keepdim=True)

    def pull(x):
        return dhat(x).pow(2) * off * 0.5 / (n * (n - 1))  # ½: the mean of the two heads' RC

    def push(x):
        return torch.relu(delta - dhat(x)).pow(2) * off * 0.5 / (n * (n - 1))

    def kl_terms(x):
        log_q = F.log_softmax(-dhat(x), dim=1)
        log_p = F.log_softmax(-dhat(s_g), dim=1)
        return log_p.exp() * (log_p - log_q) / n

    def abs_sum(fn, x):
        return jac(fn, x).abs().sum(dim=(0, 1)).numpy()  # Σ over the n × n terms, per input entry

    def head(x, d):
        k = 5 * d + 3 * n + 24
        pull_j, push_j = jac(pull, x), jac(push, x)
        terms = (w[:, :, None, None] * pull_j + (1 - w)[:, :, None, None] * push_j).abs().sum(dim=(0, 1))
        return gamma(k) * terms.numpy() + dw * (pull_j.abs() + push_j.abs()).sum(dim=(0, 1)).numpy()

    d_f, d_g = s_f.shape[1], s_g.shape[1]
    grad_f = head(s_f, d_f) + gamma(5 * d_f + 3 * n + 24) * abs_sum(kl_terms, s_f)
    return 2 * grad_f, 2 * head(s_g, d_g)


def _random_inputs(seed: int, b: int, d_f: int, d_g: int):
    g = torch.Generator().manual_seed(seed)
    s_f = torch.randn(b, d_f, generator=g, dtype=torch.float64)
    s_g = torch.randn(b, d_g, generator=g, dtype=torch.float64)
    t_g = s_g + 0.3 * torch.randn(b, d_g, generator=g, dtype=torch.float64)
    return s_f, s_g, t_g


# ------------------------------------------------------------------------------------------
# the loss against the references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "b", "d_f", "d_g", "topk"), [(0, 12, 8, 16, 5), (1, 16, 12, 8, 4), (2, 20, 16, 12, 7), (3, 14, 8, 8, 5)]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_loss_matches_loop_port_of_authors_code(seed, b, d_f, d_g, topk, normalize):
    s_f, s_g, t_g = _random_inputs(seed, b, d_f, d_g)
    sigma, delta = 3.0, 0.9 if seed % 2 else 1.0
    criterion = STMLLoss(sigma=sigma, delta=delta, topk=topk, normalize_student=normalize)
    out = criterion.terms(s_f, s_g, t_g)
    assert set(out) == {"loss", "loss_rc", "loss_kl"} and all(v.dim() == 0 for v in out.values())
    f_np, g_np, t_np = s_f.numpy(), s_g.numpy(), t_g.numpy()
    ref_loss, ref_rc, ref_kl = _ref_stml(f_np, g_np, t_np, sigma, delta, topk, normalize)
    assert_stable_topk(t_np, sigma, topk)  # the discrete neighbour sets are not in question
    rc_err = 0.5 * (
        _rc_error(f_np, t_np, sigma, delta, topk, normalize) + _rc_error(g_np, t_np, sigma, delta, topk, normalize)
    )
    kl_err = _kl_error(f_np, g_np, normalize)
    assert abs(out["loss_rc"].item() - ref_rc) <= rc_err + u() * ref_rc  # ½(a + b): one rounding
    assert abs(out["loss_kl"].item() - ref_kl) <= kl_err
    assert abs(out["loss"].item() - ref_loss) <= rc_err + kl_err + 2 * u() * ref_loss
    w_err = 2 * stml_similarity_error(t_np, sigma, topk)  # ours and the loop reference
    assert_within(criterion.last_similarity, _ref_similarity(t_np, sigma, topk), w_err, "W")
    assert (
        abs(
            STMLLoss(sigma=sigma, delta=delta * (1 + 1e-9), topk=topk, normalize_student=normalize)
            .terms(s_f, s_g, t_g)["loss_rc"]
            .item()
            - ref_rc
        )
        > rc_err
    )
    assert not criterion.last_similarity.requires_grad


@pytest.mark.parametrize("normalize", [True, False])
def test_values_and_gradients_match_authors_torch_code(normalize):
    s_f, s_g, t_g = _random_inputs(7, 16, 8, 12)
    sigma, delta, topk = 3.0, 1.0, 5
    ours_f, ours_g = s_f.clone().requires_grad_(), s_g.clone().requires_grad_()
    theirs_f, theirs_g = s_f.clone().requires_grad_(), s_g.clone().requires_grad_()
    out = STMLLoss(sigma=sigma, delta=delta, topk=topk, normalize_student=normalize).terms(ours_f, ours_g, t_g)
    out["loss"].backward()
    idx = torch.arange(16)
    rc = (
        _theirs_rc(theirs_f, t_g, idx, sigma, delta, topk, normalize)
        + _theirs_rc(theirs_g, t_g, idx, sigma, delta, topk, normalize)
    ) / 2
    kl = _theirs_kl(theirs_f, theirs_g, normalize)
    (rc + kl).backward()
    f_np, g_np, t_np = s_f.numpy(), s_g.numpy(), t_g.numpy()
    assert_stable_topk(t_np, sigma, topk)
    # both are within the bounds of the loop reference's, so within them of each other
    rc_err = _rc_error(f_np, t_np, sigma, delta, topk, normalize) + _rc_error(g_np, t_np, sigma, delta, topk, normalize)
    assert abs(out["loss_rc"].item() - rc.item()) <= rc_err + 2 * u() * rc.item()
    assert abs(out["loss_kl"].item() - kl.item()) <= 2 * _kl_error(f_np, g_np, normalize)
    grad_f_err, grad_g_err = _gradient_errors(s_f, s_g, t_g, sigma, delta, topk, normalize)
    assert_within(ours_f.grad, theirs_f.grad, grad_f_err, "gradient to f")
    assert_within(ours_g.grad, theirs_g.grad, grad_g_err, "gradient to g")


def test_plain_functions_and_options():
    s_f, s_g, t_g = _random_inputs(4, 12, 8, 16)
    w, _ = stml_similarity(t_g, sigma=3.0, topk=5)
    f_np, g_np, t_np = s_f.numpy(), s_g.numpy(), t_g.numpy()
    assert_stable_topk(t_np, 3.0, 5)
    rc = stml_rc_loss(s_f, w, delta=1.0)
    assert abs(rc.item() - _ref_rc(f_np, t_np, 3.0, 1.0, 5, True)) <= _rc_error(f_np, t_np, 3.0, 1.0, 5, True)
    kl2 = stml_kl_loss(s_f, s_g, temperature=2.0)
    kl2_err = _kl_error(f_np, g_np, True, temperature=2.0)
    assert abs(kl2.item() - _ref_kl(f_np, g_np, True, temperature=2.0)) <= kl2_err
    out = STMLLoss(weight_kl=0.25).terms(s_f, s_g, t_g)
    assert out["loss"].item() == (out["loss_rc"] + 0.25 * out["loss_kl"]).item()  # the same two operations
    # the query expansion option reaches the similarity (the same function on the same values)
    crit = STMLLoss(topk=6, query_expansion=1)
    crit.terms(s_f, s_g, t_g)
    expanded = stml_similarity(t_g, sigma=3.0, topk=6, query_expansion=1)[0]
    torch.testing.assert_close(crit.last_similarity, expanded, rtol=0, atol=0)
    assert not torch.equal(expanded, stml_similarity(t_g, sigma=3.0, topk=6)[0])
    crit.after_step()  # a no-op the trainer calls


def test_kl_is_zero_when_heads_agree():
    s_f, _, _ = _random_inputs(5, 10, 8, 8)
    # normalize(3x) = normalize(x) exactly in exact arithmetic: KL = 0 up to _kl_error
    x = s_f.numpy()
    assert abs(stml_kl_loss(s_f, 3.0 * s_f).item()) <= _kl_error(x, 3.0 * x, True)
    assert stml_kl_loss(s_f, s_f + 0.01 * torch.randn_like(s_f)).item() > _kl_error(x, x, True)


# ------------------------------------------------------------------------------------------
# gradient routing
# ------------------------------------------------------------------------------------------


def test_gradient_routing():
    s_f, s_g, t_g = (t.requires_grad_() for t in _random_inputs(6, 12, 8, 16))
    out = STMLLoss().terms(s_f, s_g, t_g)
    out["loss"].backward()
    assert t_g.grad is None  # the teacher's targets carry no gradient
    assert s_f.grad.abs().sum() > 0 and s_g.grad.abs().sum() > 0

    # the KL term reaches f only (its g target is detached)
    f, g = (t.detach().clone().requires_grad_() for t in (s_f, s_g))
    stml_kl_loss(f, g).backward()
    assert g.grad is None and f.grad.abs().sum() > 0

    # the RC term reaches both heads
    f, g, t = (x.detach().clone().requires_grad_() for x in (s_f, s_g, t_g))
    STMLLoss().terms(f, g, t)["loss_rc"].backward()
    assert f.grad.abs().sum() > 0 and g.grad.abs().sum() > 0 and t.grad is None


# ------------------------------------------------------------------------------------------
# the two-head model
# ------------------------------------------------------------------------------------------


def test_model_heads_share_one_backbone_pass():
    base = tiny_model(embedding_dim=16)
    model = STMLModel(base, g_dim=12)
    assert model.backbone is base.backbone and model.embedding is base.embedding
    assert (model.feature_dim, model.embedding_dim, model.g_dim, model.backbone_name) == (24, 16, 12, "tiny")
    x = torch.randn(5, 3, 12, 12)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(model.pooled_features(x), base.pooled_features(x), rtol=0, atol=0)

    calls = []
    handle = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    f, g = model.forward_heads(x)
    assert len(calls) == 1
    f2, g2 = model(x, both_heads=True)
    assert len(calls) == 2
    handle.remove()
    torch.testing.assert_close(f, model(x), rtol=0, atol=0)
    torch.testing.assert_close((f2, g2), (f, g), rtol=0, atol=0)
    assert g.shape == (5, 12)
    # normalisation (norm and division: γ_{d+3} per entry of a unit row) and the norm (γ_{d+2})
    assert_within(g.norm(dim=1), torch.ones(5), gamma(2 * 12 + 5, torch.float32), "‖g‖")
    features = base.pooled_features(x)
    # the same operations on the same values as forward_heads: equal
    torch.testing.assert_close(g, F.normalize(model.embedding_g(features), dim=1), rtol=0, atol=0)

    raw = STMLModel(base, g_dim=12, normalize_heads=False)
    f_raw, g_raw = raw.forward_heads(x)
    torch.testing.assert_close(f_raw, base.embedding(features), rtol=0, atol=0)
    torch.testing.assert_close(g_raw, raw.embedding_g(features), rtol=0, atol=0)
    torch.testing.assert_close(raw(x), base(x), rtol=0, atol=0)  # evaluation stays normalised


def test_model_state_dict_init_and_teacher():
    base = tiny_model(embedding_dim=16)
    base_keys = set(base.state_dict())
    model = STMLModel(base, g_dim=12)
    keys = set(model.state_dict())
    assert keys == base_keys | {"embedding_g.weight", "embedding_g.bias"}
    w = model.embedding_g.weight.detach().clone()
    # orthogonal rows (12 <= 24): nn.init.orthogonal_ is a float32 Householder QR of a 24 × 12
    # matrix (qr_orthonormality) and this product adds γ_24 on sums of |w_i||w_j| <= 1 + that
    f32 = torch.float32
    orthonormal = qr_orthonormality(24, 12, f32)
    assert_within(w @ w.T, torch.eye(12), orthonormal + gamma(24, f32) * (1 + orthonormal), "W Wᵀ")
    assert model.embedding_g.bias.abs().sum() == 0
    # the EMA teacher of the trainer works on the two-head model
    teacher = make_teacher(model)
    with torch.no_grad():
        model.embedding_g.weight.add_(1.0)
    ema_update(teacher, model, 0.5)
    # lerp w + ½((w + 1) - w): the student's w + 1, the difference, the product, the sum (4u
    # on values <= |w| + 1), and the expected w + 0.5 (u)
    bound = 5 * u(torch.float32) * (w.abs() + 1)
    assert_within(teacher.embedding_g.weight, w + 0.5, bound, "EMA teacher")


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"delta": -0.1}, "delta"),
        ({"topk": 0}, "topk"),
        ({"topk": 2.5}, "topk"),
        ({"query_expansion": 0}, "query_expansion"),
        ({"weight_kl": -1.0}, "weight_kl"),
        ({"normalize_student": 1}, "normalize_student"),
    ],
)
def test_bad_options_raise(options, name):
    with pytest.raises(ValueError, match=name):
        STMLLoss(**options)


def test_bad_shapes_raise():
    s_f, s_g, t_g = _random_inputs(8, 10, 8, 16)
    crit = STMLLoss()
    with pytest.raises(ValueError, match="student_f"):
        crit.terms(s_f[0], s_g, t_g)
    with pytest.raises(ValueError, match="student_g"):
        crit.terms(s_f, s_g[:9], t_g)
    with pytest.raises(ValueError, match="teacher_g"):
        crit.terms(s_f, s_g, t_g[:, :8])
    with pytest.raises(ValueError, match="teacher_g"):
        crit.terms(s_f, s_g, torch.full_like(t_g, float("nan")))
    with pytest.raises(ValueError, match="student_f"):
        crit.terms(s_f[:1], s_g[:1], t_g[:1])
    with pytest.raises(ValueError, match="temperature"):
        stml_kl_loss(s_f, s_g, temperature=0.0)
    with pytest.raises(ValueError, match="student_g"):
        stml_kl_loss(s_f, s_g[:9])
    with pytest.raises(ValueError, match="delta"):
        stml_rc_loss(s_f, torch.eye(10, dtype=s_f.dtype), delta=-1.0)
    with pytest.raises(ValueError, match="g_dim"):
        STMLModel(tiny_model(), g_dim=0)
    with pytest.raises(TypeError, match="EmbeddingModel"):
        STMLModel(torch.nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------


def test_targets_and_loss_follow_cluster_structure():
    g = torch.Generator().manual_seed(0)
    n_per, d = 8, 8
    centres = torch.eye(d, dtype=torch.float64)[:2]
    labels = torch.arange(2).repeat_interleave(n_per)
    teacher = F.normalize(centres[labels] + 0.05 * torch.randn(2 * n_per, d, generator=g, dtype=torch.float64), dim=1)
    w, _ = stml_similarity(teacher, sigma=3.0, topk=5)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(2 * n_per, dtype=torch.bool)
    within, across = w[same & off_diagonal], w[~same]
    assert within.min() > 0.45 and across.max() < 0.3 and within.min() > across.max()

    separated = teacher.clone()
    mixed = teacher[torch.arange(2 * n_per).view(2, n_per).T.reshape(-1)]  # interleave: clusters mixed up
    assert stml_rc_loss(separated, w).item() < stml_rc_loss(mixed, w).item()
    crit = STMLLoss()
    assert crit.terms(separated, separated, teacher)["loss"] < crit.terms(mixed, mixed, teacher)["loss"]


def test_a_switched_off_kl_term_is_left_out():
    s_f, s_g, t_g = _random_inputs(4, 12, 8, 16)
    on = STMLLoss(weight_kl=0.25).terms(s_f, s_g, t_g)
    off = STMLLoss(weight_kl=0.0).terms(s_f, s_g, t_g)
    assert set(on) == {"loss", "loss_rc", "loss_kl"} and set(off) == {"loss", "loss_rc"}
    assert torch.equal(off["loss"], on["loss_rc"])
