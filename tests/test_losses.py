"""Specification tests for `eztinker.engine.losses`.

Every reference below is written independently of the module: explicit Python loops / plain numpy in
float64, straight from the formulas in the docstrings (Tinker's docs for the token family).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eztinker.engine.errors import InvalidInputError, UnknownLossError
from eztinker.engine.losses import (
    IGNORE_INDEX,
    default_normalizer,
    get_loss_function,
    get_loss_spec,
    list_losses,
    register_loss_function,
    shifted_target_logprobs,
    unregister_loss_function,
    weights_from_logprob_grads,
)

NATIVE = ["contrastive_loss", "cross_entropy", "focal_loss", "smooth_l1", "weighted_cross_entropy"]
TOKEN = ["cispo", "cross_entropy", "dro", "gspo", "importance_sampling", "ppo", "stable_reinforce"]

# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


def _native_batch(B: int = 3, T: int = 6, V: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0:3] = IGNORE_INDEX  # a "prompt"
    labels[1, -2:] = IGNORE_INDEX  # padding
    labels[2, 3] = IGNORE_INDEX
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 + 0.1
    return logits, labels, weights


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _ref_logprob(z: np.ndarray, y: int) -> float:
    m = max(z)
    return float(z[y] - (m + math.log(sum(math.exp(v - m) for v in z))))


def _ref_native(logits, labels, weights, per_token, *, weighted_mean: bool = False) -> float:
    """mean over non-ignored shifted targets of w_t · per_token(z_t, y_t) (or Σ w·ℓ / Σ w)."""
    z, y = _np(logits), labels.numpy()
    w = None if weights is None else _np(weights)
    num, den = 0.0, 0.0
    B, T, _ = z.shape
    for b in range(B):
        for t in range(T - 1):
            label = int(y[b, t + 1])
            if label == IGNORE_INDEX:
                continue
            wt = 1.0 if w is None else float(w[b, t + 1])
            num += wt * per_token(z[b, t], label)
            den += wt if weighted_mean else 1.0
    return num / den if den else 0.0


def _nll(z, y):
    return -_ref_logprob(z, y)


def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _huber(x: float, beta: float) -> float:
    if beta == 0:
        return abs(x)
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


# ----------------------------------------------------------------------------------------------------
# Native family
# ----------------------------------------------------------------------------------------------------


def test_builtin_names():
    assert list_losses("native") == NATIVE
    assert list_losses("token") == TOKEN
    assert list_losses() == sorted(set(NATIVE) | set(TOKEN))


def test_shifted_target_logprobs_matches_loops():
    logits, labels, _ = _native_batch()
    got = shifted_target_logprobs(logits, labels)
    assert got.shape == (3, 5)
    z, y = _np(logits), labels.numpy()
    for b in range(3):
        for t in range(5):
            want = 0.0 if y[b, t + 1] == IGNORE_INDEX else _ref_logprob(z[b, t], int(y[b, t + 1]))
            assert got[b, t].item() == pytest.approx(want, abs=1e-12)


def test_shifted_target_logprobs_upcasts_bf16():
    logits, labels, _ = _native_batch()
    lb = logits.to(torch.bfloat16)
    got = shifted_target_logprobs(lb, labels)
    assert got.dtype == torch.float32
    want = shifted_target_logprobs(lb.to(torch.float64), labels)  # same (rounded) inputs, in fp64
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_weights", [False, True])
def test_native_cross_entropy(use_weights):
    logits, labels, weights = _native_batch()
    w = weights if use_weights else None
    got = get_loss_function("cross_entropy")(logits, labels, w)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_ref_native(logits, labels, w, _nll), abs=1e-12)
    if not use_weights:  # and the same as PyTorch's own mean cross-entropy
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert got.item() == pytest.approx(ce.item(), abs=1e-12)


@pytest.mark.parametrize("use_weights", [False, True])
def test_native_weighted_cross_entropy(use_weights):
    logits, labels, weights = _native_batch()
    w = weights if use_weights else None
    got = get_loss_function("weighted_cross_entropy")(logits, labels, w)
    want = _ref_native(logits, labels, w, _nll, weighted_mean=True)
    assert got.item() == pytest.approx(want, abs=1e-12)
    norm = get_loss_spec("weighted_cross_entropy", "native").normalize(labels, w)
    y = labels.numpy()
    if use_weights:
        want_norm = sum(
            float(weights[b, t]) for b in range(3) for t in range(1, 6) if y[b, t] != IGNORE_INDEX
        )
    else:
        want_norm = float((y[:, 1:] != IGNORE_INDEX).sum())
    assert norm.item() == pytest.approx(want_norm, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "alpha", "gamma"),
    [
        ({}, 0.25, 2.0),
        ({"focal_alpha": 0.3, "focal_gamma": 2.5}, 0.3, 2.5),
        ({"focal_alpha": None}, 0.25, 2.0),
    ],
)
def test_native_focal_loss(kwargs, alpha, gamma):
    logits, labels, weights = _native_batch()

    def focal(z, y):
        p = math.exp(_ref_logprob(z, y))
        return alpha * (1.0 - p) ** gamma * -math.log(p)

    fn = get_loss_function("focal_loss")
    assert fn(logits, labels, **kwargs).item() == pytest.approx(
        _ref_native(logits, labels, None, focal), abs=1e-12
    )
    got_w = fn(logits, labels, weights, **kwargs).item()
    assert got_w == pytest.approx(_ref_native(logits, labels, weights, focal), abs=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_native_smooth_l1(beta):
    logits, labels, weights = _native_batch()

    def smooth(z, y):
        p = _softmax(z)
        return sum(_huber(p[v] - (1.0 if v == y else 0.0), beta) for v in range(len(z)))

    fn = get_loss_function("smooth_l1")
    kwargs = {} if beta == 1.0 else {"smooth_l1_beta": beta}
    assert fn(logits, labels, **kwargs).item() == pytest.approx(
        _ref_native(logits, labels, None, smooth), abs=1e-12
    )
    assert fn(logits, labels, weights, **kwargs).item() == pytest.approx(
        _ref_native(logits, labels, weights, smooth), abs=1e-12
    )


@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_native_contrastive_loss(margin):
    logits, labels, weights = _native_batch()

    def hinge(z, y):
        strongest_negative = max(z[v] for v in range(len(z)) if v != y)
        return max(0.0, margin - (z[y] - strongest_negative))

    fn = get_loss_function("contrastive_loss")
    kwargs = {} if margin == 1.0 else {"contrastive_margin": margin}
    assert fn(logits, labels, **kwargs).item() == pytest.approx(
        _ref_native(logits, labels, None, hinge), abs=1e-12
    )
    assert fn(logits, labels, weights, **kwargs).item() == pytest.approx(
        _ref_native(logits, labels, weights, hinge), abs=1e-12
    )
    # The hinge is active on some tokens (and, at margin 1, inactive on others): the test means something.
    z, y = _np(logits), labels.numpy()
    per = [
        hinge(z[b, t], int(y[b, t + 1])) for b in range(3) for t in range(5) if y[b, t + 1] != IGNORE_INDEX
    ]
    assert any(v > 0 for v in per)
    assert margin != 1.0 or any(v == 0 for v in per)


def test_native_losses_ignore_unknown_kwargs():
    logits, labels, weights = _native_batch()
    for name in NATIVE:
        fn = get_loss_function(name)
        a = fn(logits, labels, weights)
        b = fn(logits, labels, weights, loss_type=name, learning_rate=1e-3, something_new="x")
        assert a.item() == b.item()


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("use_weights", [False, True])
def test_native_chunk_combining_is_exact(name, use_weights):
    """Σ_c loss_c·n_c / Σ_c n_c over chunks == the one-pass loss, for every built-in."""
    logits, labels, weights = _native_batch(B=4, seed=3)
    w = weights if use_weights else None
    spec = get_loss_spec(name, "native")
    whole = spec.fn(logits, labels, w).item()
    num, den = 0.0, 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        wc = None if w is None else w[sl]
        n_c = spec.normalize(labels[sl], wc).item()
        num += spec.fn(logits[sl], labels[sl], wc).item() * n_c
        den += n_c
    assert num / den == pytest.approx(whole, rel=1e-6, abs=1e-9)


def test_default_normalizer_counts_non_ignored_shifted_labels():
    _, labels, weights = _native_batch()
    expected = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert default_normalizer(labels, None).item() == expected
    assert default_normalizer(labels, weights).item() == expected
    assert get_loss_spec("focal_loss", "native").normalize(labels, weights).item() == expected


@pytest.mark.parametrize("name", NATIVE)
def test_native_all_ignored_gives_zero_and_zero_grad(name):
    logits, labels, _ = _native_batch()
    labels = torch.full_like(labels, IGNORE_INDEX)
    logits = logits.clone().requires_grad_(True)
    loss = get_loss_function(name)(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", NATIVE)
def test_native_ignored_positions_do_not_matter(name):
    """Changing logits that only predict ignored labels changes neither value nor gradient elsewhere."""
    logits, labels, weights = _native_batch()
    fn = get_loss_function(name)
    base = fn(logits, labels, weights).item()
    poked = logits.clone()
    poked[1, -3:] += 100.0  # positions 3, 4 predict labels[1, 4:] (ignored); position 5 predicts nothing
    poked[0, 0:2] -= 50.0  # positions 0, 1 predict labels[0, 1:3] (ignored)
    assert fn(poked, labels, weights).item() == pytest.approx(base, abs=1e-12)


def test_native_bf16_logits():
    logits, labels, _ = _native_batch()
    for name in NATIVE:
        got = get_loss_function(name)(logits.to(torch.bfloat16), labels)
        assert got.dtype == torch.float32
        assert torch.isfinite(got)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


def my_custom_loss(logits, labels, weights=None, *, temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """The seed spec's example, verbatim."""
    shift_logits = logits[:, :-1, :].contiguous() / temperature
    shift_labels = labels[:, 1:].contiguous()
    return torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)),
        shift_labels.view(-1),
        ignore_index=kwargs.get("ignore_index", -100),
    )


@pytest.fixture
def cleanup_registry():
    added: list[str] = []
    yield added
    for name in added:
        with contextlib.suppress(UnknownLossError):
            unregister_loss_function(name)


def test_register_round_trip_seed_example(cleanup_registry):
    cleanup_registry.append("temperature_scaled")
    register_loss_function("temperature_scaled", my_custom_loss)
    assert get_loss_function("temperature_scaled") is my_custom_loss
    spec = get_loss_spec("temperature_scaled", "native")
    assert spec.family == "native"
    assert "temperature_scaled" in list_losses("native")

    logits, labels, _ = _native_batch()
    got = get_loss_function("temperature_scaled")(logits, labels, None, temperature=2.0, loss_type="x")
    want = _ref_native(logits / 2.0, labels, None, _nll)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # default normalizer: chunks combine exactly for this mean loss too
    assert spec.normalize(labels, None).item() == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_register_replaces_and_custom_normalizer(cleanup_registry):
    cleanup_registry.append("twice")
    register_loss_function("twice", lambda logits, labels, weights=None, **kw: logits.sum() * 0 + 1.0)
    second = lambda logits, labels, weights=None, **kw: logits.sum() * 0 + 2.0  # noqa: E731
    norm = lambda labels, weights: torch.tensor(7.0)  # noqa: E731
    register_loss_function("twice", second, normalizer=norm)
    assert get_loss_function("twice") is second
    assert get_loss_spec("twice", "native").normalize(torch.zeros(1, 2, dtype=torch.long)).item() == 7.0
    unregister_loss_function("twice")
    with pytest.raises(UnknownLossError):
        get_loss_function("twice")


def test_register_validates_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        register_loss_function("  ", my_custom_loss)
    with pytest.raises(TypeError, match="str"):
        register_loss_function(3, my_custom_loss)  # ty: ignore[invalid-argument-type]
    with pytest.raises(TypeError, match="callable"):
        register_loss_function("bad", "not a function")  # ty: ignore[invalid-argument-type]
    with pytest.raises(TypeError, match="normalizer"):
        register_loss_function("bad", my_custom_loss, normalizer=5)  # ty: ignore[invalid-argument-type]
    assert "bad" not in list_losses("native")


def test_unknown_native_loss_lists_known_names_and_how_to_add():
    with pytest.raises(UnknownLossError) as exc:
        get_loss_function("nope")
    err = exc.value
    assert isinstance(err, InvalidInputError)
    assert err.field == "loss_type"
    for name in NATIVE:
        assert name in str(err)
    assert "register_loss_function" in str(err)
    assert "plugin" in str(err)


def test_unknown_token_loss_lists_known_names():
    with pytest.raises(UnknownLossError) as exc:
        get_loss_spec("nope", "token")
    assert exc.value.field == "loss_fn"
    for name in TOKEN:
        assert name in str(exc.value)


def test_unknown_loss_points_to_other_family():
    with pytest.raises(UnknownLossError, match="Tinker"):
        get_loss_function("ppo")
    with pytest.raises(UnknownLossError, match="native"):
        get_loss_spec("focal_loss", "token")
    with pytest.raises(ValueError, match="family"):
        get_loss_spec("ppo", "tinker")  # ty: ignore[invalid-argument-type]


# ----------------------------------------------------------------------------------------------------
# Token family: references
# ----------------------------------------------------------------------------------------------------

# Two datums; datum 1 is padded (length 3 of 5). Values chosen so PPO/CISPO clip on both sides, with
# advantages of both signs.
LP = [[-1.0, -0.5, -2.0, -0.1, -1.5], [-0.7, -3.0, -0.2, 0.0, 0.0]]
Q = [[-1.3, -0.4, -1.2, -0.1, -2.0], [-0.5, -3.1, -0.9, 0.0, 0.0]]
ADV = [[1.0, -0.5, 2.0, 0.0, -1.5], [-1.0, 0.5, 1.5, 0.0, 0.0]]
LENGTHS = [5, 3]


def _token_batch(dtype=torch.float64):
    lp = torch.tensor(LP, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[t < n for t in range(5)] for n in LENGTHS])
    inputs = {"logprobs": torch.tensor(Q, dtype=dtype), "advantages": torch.tensor(ADV, dtype=dtype)}
    return lp, inputs, mask


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def _ref_token(per_token) -> list[float]:
    """Σ over real positions of per_token(lp, q, A, b, t), per datum."""
    return [
        sum(per_token(LP[b][t], Q[b][t], ADV[b][t], b, t) for t in range(LENGTHS[b])) for b in range(len(LP))
    ]


def _call(name, lp, inputs, mask, **config):
    spec = get_loss_spec(name, "token")
    return spec.fn(lp, inputs, mask, **spec.resolve_config(config))


def _grad(loss: torch.Tensor, lp: torch.Tensor) -> list[list[float]]:
    (g,) = torch.autograd.grad(loss.sum(), lp)
    return g.tolist()


def _assert_grad(got, ref_fn):
    for b in range(len(LP)):
        for t in range(5):
            want = ref_fn(LP[b][t], Q[b][t], ADV[b][t], b, t) if t < LENGTHS[b] else 0.0
            assert got[b][t] == pytest.approx(want, abs=1e-12), (b, t)


def test_token_cross_entropy_default_and_weighted():
    lp, _, mask = _token_batch()
    got = _call("cross_entropy", lp, {}, mask)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(_ref_token(lambda lp_, q, a, b, t: -lp_), abs=1e-12)
    assert _grad(got, lp) == [[-1.0] * 5, [-1.0, -1.0, -1.0, 0.0, 0.0]]

    w = [[1.0, 0.0, 2.0, 0.5, 1.0], [3.0, 0.0, -1.0, 0.0, 0.0]]
    got = _call("cross_entropy", lp, {"weights": torch.tensor(w, dtype=torch.float64)}, mask)
    assert got.tolist() == pytest.approx(_ref_token(lambda lp_, q, a, b, t: -w[b][t] * lp_), abs=1e-12)
    _assert_grad(_grad(got, lp), lambda lp_, q, a, b, t: -w[b][t])


def test_token_cross_entropy_topk():
    """(N, K) targets: Σ_t Σ_k −w_{t,k}·lp_{t,k}; padding rows contribute nothing."""
    g = torch.Generator().manual_seed(1)
    lp_value = -torch.rand(2, 4, 3, generator=g, dtype=torch.float64) * 3
    lp = lp_value.clone().requires_grad_(True)
    w = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    w_padded = w.clone()
    w_padded[1, 2:] = 0.0
    got = _call("cross_entropy", lp, {"weights": w_padded}, mask)
    want = [
        sum(
            -float(w[b, t, k]) * float(lp_value[b, t, k]) for t in range(4 if b == 0 else 2) for k in range(3)
        )
        for b in range(2)
    ]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), lp)
    assert torch.equal(grad[1, 2:], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(grad[0], -w[0])
    # without weights: 1 on every real (t, k)
    got = _call("cross_entropy", lp, {}, mask)
    want = [
        sum(-float(lp_value[b, t, k]) for t in range(4 if b == 0 else 2) for k in range(3)) for b in range(2)
    ]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert get_loss_spec("cross_entropy", "token").supports_topk
    assert not get_loss_spec("ppo", "token").supports_topk


def test_token_importance_sampling_value_and_grad():
    lp, inputs, mask = _token_batch()
    got = _call("importance_sampling", lp, inputs, mask)
    assert got.tolist() == pytest.approx(
        _ref_token(lambda lp_, q, a, b, t: -math.exp(lp_ - q) * a), abs=1e-12
    )
    _assert_grad(_grad(got, lp), lambda lp_, q, a, b, t: -math.exp(lp_ - q) * a)


def _ppo_ref(lo, hi):
    def value(lp_, q, a, b, t):
        r = math.exp(lp_ - q)
        return -min(r * a, _clip(r, lo, hi) * a)

    def grad(lp_, q, a, b, t):
        r = math.exp(lp_ - q)
        unclipped_active = r * a <= _clip(r, lo, hi) * a
        return -r * a if unclipped_active else 0.0

    return value, grad


@pytest.mark.parametrize(
    ("config", "lo", "hi"),
    [({}, 0.8, 1.2), ({"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, 0.9, 1.1)],
)
def test_token_ppo_value_and_grad(config, lo, hi):
    lp, inputs, mask = _token_batch()
    ratios = [math.exp(LP[b][t] - Q[b][t]) for b in range(2) for t in range(LENGTHS[b])]
    assert any(r > hi for r in ratios)
    assert any(r < lo for r in ratios)  # both clip sides exercised
    value, grad = _ppo_ref(lo, hi)
    got = _call("ppo", lp, inputs, mask, **config)
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)
    _assert_grad(_grad(got, lp), grad)


def test_token_ppo_per_token_thresholds_take_precedence():
    lp, inputs, mask = _token_batch()
    lo_t = [[0.5, 0.9, 0.95, 0.8, 0.7], [0.99, 0.8, 0.6, 0.0, 0.0]]
    hi_t = [[1.5, 1.1, 1.05, 1.2, 1.3], [1.01, 1.2, 1.4, 0.0, 0.0]]
    inputs = {
        **inputs,
        "clip_low_threshold": torch.tensor(lo_t, dtype=torch.float64),
        "clip_high_threshold": torch.tensor(hi_t, dtype=torch.float64),
    }

    def value(lp_, q, a, b, t):
        r = math.exp(lp_ - q)
        return -min(r * a, _clip(r, lo_t[b][t], hi_t[b][t]) * a)

    got = _call("ppo", lp, inputs, mask, clip_low_threshold=0.1, clip_high_threshold=10.0)
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)


@pytest.mark.parametrize(
    ("config", "lo", "hi"),
    [({}, 0.8, 1.2), ({"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}, 0.95, 1.05)],
)
def test_token_cispo_value_and_grad(config, lo, hi):
    lp, inputs, mask = _token_batch()
    got = _call("cispo", lp, inputs, mask, **config)
    value = lambda lp_, q, a, b, t: -_clip(math.exp(lp_ - q), lo, hi) * lp_ * a  # noqa: E731
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)
    _assert_grad(_grad(got, lp), lambda lp_, q, a, b, t: -_clip(math.exp(lp_ - q), lo, hi) * a)


@pytest.mark.parametrize("beta", [None, 0.0, 0.7])
def test_token_dro_value_and_grad(beta):
    lp, inputs, mask = _token_batch()
    config = {} if beta is None else {"beta": beta}
    bt = 0.05 if beta is None else beta
    got = _call("dro", lp, inputs, mask, **config)
    value = lambda lp_, q, a, b, t: -(lp_ * a - 0.5 * bt * (lp_ - q) ** 2)  # noqa: E731
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)
    _assert_grad(_grad(got, lp), lambda lp_, q, a, b, t: -a + bt * (lp_ - q))


def _gspo_ref(ratio_mask, lo, hi):
    """s_b = exp(mean over M of (lp − q)); loss = Σ_t −min(s·A, clip(s)·A); d/dlp_t = −s·A_t if unclipped."""
    s = []
    for b in range(2):
        ts = [t for t in range(LENGTHS[b]) if ratio_mask[b][t] != 0]
        s.append(math.exp(sum(LP[b][t] - Q[b][t] for t in ts) / len(ts)) if ts else 1.0)

    def value(lp_, q, a, b, t):
        return -min(s[b] * a, _clip(s[b], lo, hi) * a)

    def grad(lp_, q, a, b, t):
        return -s[b] * a if s[b] * a <= _clip(s[b], lo, hi) * a else 0.0

    return s, value, grad


@pytest.mark.parametrize("with_ratio_mask", [False, True])
def test_token_gspo_value_and_grad(with_ratio_mask):
    lp, inputs, mask = _token_batch()
    if with_ratio_mask:
        ratio_mask = [[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 0.0]]
        inputs = {**inputs, "sequence_ratio_mask": torch.tensor(ratio_mask, dtype=torch.float64)}
    else:
        ratio_mask = [[1.0] * 5, [1.0] * 5]
    lo, hi = 0.95, 1.05
    s, value, grad = _gspo_ref(ratio_mask, lo, hi)
    assert any(not lo <= v <= hi for v in s)  # the clip is exercised
    got = _call("gspo", lp, inputs, mask, clip_low_threshold=lo, clip_high_threshold=hi)
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)
    _assert_grad(_grad(got, lp), grad)


def test_token_gspo_is_ppo_on_the_sequence_ratio_for_one_token():
    """With a single real token, GSPO's ratio is that token's ratio: GSPO == PPO."""
    lp = torch.tensor([[-0.3]], dtype=torch.float64, requires_grad=True)
    inputs = {
        "logprobs": torch.tensor([[-0.6]], dtype=torch.float64),
        "advantages": torch.tensor([[1.0]], dtype=torch.float64),
    }
    mask = torch.tensor([[True]])
    assert _call("gspo", lp, inputs, mask).item() == pytest.approx(
        _call("ppo", lp, inputs, mask).item(), abs=1e-15
    )


@pytest.mark.parametrize(("kl", "cap"), [(None, None), (0.3, 1.1)])
def test_token_stable_reinforce_value_and_grad(kl, cap):
    lp, inputs, mask = _token_batch()
    config = {}
    if kl is not None:
        config = {"kl_coeff": kl, "truncation_cap": cap}
    k = 0.0 if kl is None else kl
    c = 2.0 if cap is None else cap
    got = _call("stable_reinforce", lp, inputs, mask, **config)
    value = lambda lp_, q, a, b, t: -min(math.exp(lp_ - q), c) * lp_ * a + k * 0.5 * (lp_ - q) ** 2  # noqa: E731
    assert got.tolist() == pytest.approx(_ref_token(value), abs=1e-12)
    _assert_grad(_grad(got, lp), lambda lp_, q, a, b, t: -min(math.exp(lp_ - q), c) * a + k * (lp_ - q))


@pytest.mark.parametrize("name", TOKEN)
def test_token_padding_contributes_nothing(name):
    """Garbage (even NaN/inf) at padding positions changes neither the loss nor the gradient."""
    lp, inputs, mask = _token_batch()
    if name == "gspo":
        inputs = {**inputs, "sequence_ratio_mask": torch.ones(2, 5, dtype=torch.float64)}
    clean = _call(name, lp, inputs, mask)
    clean_grad = _grad(clean, lp)

    dirty_lp = lp.detach().clone()
    dirty_lp[1, 3:] = torch.tensor([1e4, -1e4], dtype=torch.float64)  # exp() overflows
    dirty_lp.requires_grad_(True)
    dirty_inputs = {k: v.clone() for k, v in inputs.items()}
    for v in dirty_inputs.values():
        v[1, 3] = float("nan")
        v[1, 4] = float("inf")
    if name == "cross_entropy":
        dirty_inputs = {
            "weights": torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, float("nan"), 5.0]], dtype=torch.float64)
        }
        clean = _call(
            name,
            lp,
            {"weights": torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)},
            mask,
        )
        clean_grad = _grad(clean, lp)
    dirty = _call(name, dirty_lp, dirty_inputs, mask)
    assert dirty.tolist() == pytest.approx(clean.tolist(), abs=1e-12)
    dirty_grad = _grad(dirty, dirty_lp)
    torch.testing.assert_close(torch.tensor(dirty_grad), torch.tensor(clean_grad), atol=1e-12, rtol=0)
    assert dirty_grad[1][3:] == [0.0, 0.0]


@pytest.mark.parametrize("name", TOKEN)
def test_token_sum_convention(name):
    """Per-datum losses; the loss of a batch is the sum of the losses of its datums computed alone."""
    lp, inputs, mask = _token_batch()
    batch = _call(name, lp, inputs, mask)
    assert batch.shape == (2,)
    for b in range(2):
        n = LENGTHS[b]
        alone = _call(
            name,
            lp[b : b + 1, :n],
            {k: v[b : b + 1, :n] for k, v in inputs.items()},
            mask[b : b + 1, :n],
        )
        assert alone.item() == pytest.approx(batch[b].item(), abs=1e-12)
    # a sum, not a mean: doubling a datum doubles its loss
    doubled = _call(
        name,
        torch.cat([lp[:1], lp[:1]], dim=1),
        {k: torch.cat([v[:1], v[:1]], dim=1) for k, v in inputs.items()},
        torch.cat([mask[:1], mask[:1]], dim=1),
    )
    # (for gspo too: the sequence ratio is a geometric mean, unchanged by the duplication; the terms add)
    assert doubled.item() == pytest.approx(2 * batch[0].item(), abs=1e-12)


def test_token_rl_losses_reject_topk_targets():
    lp = torch.zeros(1, 2, 3, dtype=torch.float64)
    inputs = {
        "logprobs": torch.zeros(1, 2, 3, dtype=torch.float64),
        "advantages": torch.zeros(1, 2, 3, dtype=torch.float64),
    }
    with pytest.raises(InvalidInputError) as exc:
        _call("ppo", lp, inputs, torch.ones(1, 2, dtype=torch.bool))
    assert exc.value.field == "loss_fn_inputs.target_tokens"


def test_token_float32_inputs_with_float32_logprobs():
    lp, inputs, mask = _token_batch(torch.float32)
    for name in TOKEN:
        out = _call(name, lp, inputs, mask)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------
# Token family: specs and config
# ----------------------------------------------------------------------------------------------------


def test_token_specs_declare_inputs_and_defaults():
    ce = get_loss_spec("cross_entropy", "token")
    assert ce.required_inputs == ()
    assert "weights" in ce.optional_inputs
    assert dict(ce.config_defaults) == {}
    for name in ["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]:
        assert get_loss_spec(name, "token").required_inputs == ("logprobs", "advantages")
    for name in ["ppo", "cispo", "gspo"]:
        spec = get_loss_spec(name, "token")
        assert dict(spec.config_defaults) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
        assert {"clip_low_threshold", "clip_high_threshold"} <= set(spec.optional_inputs)
    assert "sequence_ratio_mask" in get_loss_spec("gspo", "token").optional_inputs
    assert dict(get_loss_spec("dro", "token").config_defaults) == {"beta": 0.05}
    assert dict(get_loss_spec("stable_reinforce", "token").config_defaults) == {
        "kl_coeff": 0.0,
        "truncation_cap": 2.0,
    }
    with pytest.raises(TypeError):
        get_loss_spec("dro", "token").config_defaults["beta"] = 1.0  # ty: ignore[invalid-assignment]


def test_resolve_config_merges_defaults():
    spec = get_loss_spec("ppo", "token")
    assert spec.resolve_config({}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert spec.resolve_config({"clip_high_threshold": 1.28}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.28,
    }
    assert spec.resolve_config(None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@pytest.mark.parametrize(
    ("name", "config", "field"),
    [
        ("ppo", {"clip_epsilon": 0.2}, "loss_fn_config.clip_epsilon"),
        ("cross_entropy", {"beta": 0.1}, "loss_fn_config.beta"),
        ("dro", {"beta": "big"}, "loss_fn_config.beta"),
        ("dro", {"beta": float("nan")}, "loss_fn_config.beta"),
        ("dro", {"beta": True}, "loss_fn_config.beta"),
        ("cispo", {"clip_low_threshold": 1.3}, "loss_fn_config.clip_low_threshold"),
    ],
)
def test_resolve_config_rejects_bad_keys(name, config, field):
    with pytest.raises(InvalidInputError) as exc:
        get_loss_spec(name, "token").resolve_config(config)
    assert exc.value.field == field
    assert field.split(".", 1)[1] in str(exc.value)


def test_native_resolve_config_passes_through():
    spec = get_loss_spec("focal_loss", "native")
    assert spec.resolve_config({"focal_alpha": 0.3, "anything": 1}) == {"focal_alpha": 0.3, "anything": 1}


# ----------------------------------------------------------------------------------------------------
# Custom loss by gradient (forward_backward_custom)
# ----------------------------------------------------------------------------------------------------


def test_weights_from_logprob_grads_reproduces_custom_gradient():
    """cross_entropy with w = −dC/dlp has the gradient of C (the SDK's forward_backward_custom)."""
    lp_value = torch.tensor([[-1.5, -1.5, -1.5], [-0.2, -2.0, -0.7]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)

    # client side: C = Σ lp², computed on detached logprobs from a forward pass
    lp_client = lp_value.clone().requires_grad_(True)
    (lp_client**2).sum().backward()
    assert lp_client.grad is not None
    weights = weights_from_logprob_grads(lp_client.grad)
    assert weights[0].tolist() == [3.0, 3.0, 3.0]  # −d(lp²)/dlp at lp = −1.5, as the SDK sends it

    # server side: cross_entropy with those weights
    lp_server = lp_value.clone().requires_grad_(True)
    surrogate = _call("cross_entropy", lp_server, {"weights": weights}, mask)
    (g,) = torch.autograd.grad(surrogate.sum(), lp_server)
    torch.testing.assert_close(g, 2 * lp_value)  # = dC/dlp
