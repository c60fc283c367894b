"""The gradient-noise-scale estimator on least squares, where |G|^2 and tr(Sigma) are
known in closed form.

Model: x ~ N(0, I_d), y = x . w* + e with e ~ N(0, sigma^2), per-example loss
(x . w - y)^2 / 2, evaluated at fixed weights w = w* + delta. Per-example gradient
g = x (x . delta - e), so (Isserlis) G = delta and
Sigma = |delta|^2 I + delta delta^T + sigma^2 I, hence
|G|^2 = |delta|^2 and tr(Sigma) = (d + 1) |delta|^2 + d sigma^2.
"""

from __future__ import annotations

import math

import pytest
import torch

from autotune.gns import (
    MicroBatchGradients,
    NoiseScale,
    adam_preconditioner,
    step_estimates,
)

D = 8
SIGMA = 1.0
DELTA = torch.linspace(0.2, 1.0, D, dtype=torch.float64)
DELTA = DELTA / DELTA.norm()  # |G|^2 = 1
TRUE_GRADIENT_SQ = 1.0
TRUE_TRACE = (D + 1) * 1.0 + D * SIGMA**2  # 17
TRUE_NOISE_SCALE = TRUE_TRACE / TRUE_GRADIENT_SQ


def measure(micro_batch: int, k: int, steps: int, seed: int, preconditioner=None) -> NoiseScale:
    """Real autograd gradients of a linear model, read by MicroBatchGradients."""
    model = torch.nn.Linear(D, 1, bias=False).double()
    w_star = torch.zeros(D, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_((w_star + DELTA)[None])
    gen = torch.Generator().manual_seed(seed)
    accumulator = NoiseScale()
    for _ in range(steps):
        x = torch.randn(k, micro_batch, D, generator=gen, dtype=torch.float64)
        y = x @ w_star + SIGMA * torch.randn(k, micro_batch, generator=gen, dtype=torch.float64)
        grads = MicroBatchGradients(model.parameters(), preconditioner)
        for j in range(k):
            model.zero_grad(set_to_none=True)
            loss = 0.5 * (model(x[j]).squeeze(-1) - y[j]).pow(2).mean()
            loss.backward()
            grads.add()
        accumulator.update(*grads.finish(), micro_batch=micro_batch)
    return accumulator


def test_step_estimates_formula():
    # Two micro-batches of 4 with squared norms 5 and 3, mean's squared norm 2:
    # S = 4, |G|^2 = (2*2 - 4) / 1 = 0, tr = 4 * 2 * (4 - 2) / 1 = 16.
    assert step_estimates([5.0, 3.0], 2.0, 4) == (0.0, 16.0)
    with pytest.raises(ValueError):
        step_estimates([1.0], 1.0, 4)


def test_least_squares_within_ten_percent():
    est = measure(micro_batch=8, k=4, steps=1500, seed=0).estimate()
    assert est.steps == 1500
    assert est.gradient_sq == pytest.approx(TRUE_GRADIENT_SQ, rel=0.10)
    assert est.trace == pytest.approx(TRUE_TRACE, rel=0.10)
    assert est.noise_scale == pytest.approx(TRUE_NOISE_SCALE, rel=0.10)
    # The reported uncertainty covers the truth and is informative.
    assert abs(est.noise_scale - TRUE_NOISE_SCALE) < 3 * est.noise_scale_stderr
    assert est.relative_stderr < 0.05


def test_invariant_to_the_batch_used_to_measure():
    results = {
        (b, k): measure(micro_batch=b, k=k, steps=1000, seed=b * 100 + k).estimate()
        for b, k in ((2, 4), (8, 2), (32, 4))
    }
    values = list(results.values())
    for i, a in enumerate(values):
        assert abs(a.noise_scale - TRUE_NOISE_SCALE) < 3 * a.noise_scale_stderr, results
        for b in values[i + 1 :]:
            combined = math.hypot(a.noise_scale_stderr, b.noise_scale_stderr)
            assert abs(a.noise_scale - b.noise_scale) < 3 * combined, results


def test_preconditioned_space_closed_form():
    # Dividing gradients by a fixed diagonal p: G' = delta / p,
    # tr(Sigma') = sum_i Sigma_ii / p_i^2 with Sigma_ii = |delta|^2 + delta_i^2 + sigma^2.
    p = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    expected_g = float((DELTA / p).pow(2).sum())
    expected_t = float(((1.0 + DELTA**2 + SIGMA**2) / p**2).sum())
    est = measure(8, 4, 1500, seed=3, preconditioner=lambda param: p[None]).estimate()
    assert est.gradient_sq == pytest.approx(expected_g, rel=0.10)
    assert est.trace == pytest.approx(expected_t, rel=0.10)
    assert est.noise_scale == pytest.approx(expected_t / expected_g, rel=0.10)


def test_adam_preconditioner_reads_bias_corrected_second_moment():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=1e-3, betas=(0.5, 0.9), eps=1e-3)
    precondition = adam_preconditioner(opt)
    assert precondition(param) is None  # no state yet
    v = torch.tensor([0.01, 0.04, 0.09])
    opt.state[param] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros(3), "exp_avg_sq": v}
    assert precondition(param) is None  # too young: identity
    opt.state[param]["step"] = torch.tensor(10.0)
    expected = (v / (1 - 0.9**10)).sqrt() + 1e-3
    assert torch.allclose(precondition(param), expected)


def test_mixed_precision_scale_is_divided_out():
    param = torch.nn.Parameter(torch.zeros(2))
    unscaled, scaled = MicroBatchGradients([param]), MicroBatchGradients([param])
    for grad in (torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])):
        param.grad = grad.clone()
        unscaled.add()
        param.grad = grad * 1024
        scaled.add(grad_scale=1024.0)
    assert scaled.finish() == unscaled.finish() == ([5.0, 10.0], 4.25)


def test_decay_weights_recent_steps_and_state_round_trips():
    acc = NoiseScale(decay=0.5)
    acc.add(1.0, 10.0)
    acc.add(1.0, 30.0)
    # weights 0.5 and 1: trace mean (5 + 30) / 1.5.
    assert acc.estimate().trace == pytest.approx(35.0 / 1.5)
    assert acc.steps == pytest.approx(1.5**2 / 1.25)
    copy = NoiseScale()
    copy.load_state_dict(acc.state_dict())
    assert copy.estimate() == acc.estimate()


def test_non_finite_steps_are_skipped_and_nonpositive_gradient_is_infinite():
    acc = NoiseScale()
    assert not acc.add(float("nan"), 1.0)
    assert acc.skipped_steps == 1
    with pytest.raises(ValueError):
        acc.estimate()
    acc.add(-0.5, 3.0)
    acc.add(0.1, 3.0)
    est = acc.estimate()
    assert est.noise_scale == math.inf
    assert est.to_dict()["noise_scale"] is None
