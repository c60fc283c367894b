"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, measured from micro-batches.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A): with
``k`` micro-batches of ``b`` examples in one step, the squared norms of each
micro-batch's mean gradient (batch ``b``) and of their mean (batch ``k b``) give, per
step, unbiased estimates of the true gradient's squared norm and of the per-example
covariance's trace:

    S = mean_j |g_j|^2                 (k micro-batch gradients, each of b examples)
    M = |mean_j g_j|^2                 (the k b-example gradient)
    |G|^2     ~ (k M - S) / (k - 1)
    tr(Sigma) ~ b k (S - M) / (k - 1)

Each per-step estimate is very noisy (|G|^2 often comes out negative), so the two are
accumulated separately over steps and divided only at the end; the ratio's standard
error comes from the scatter of the per-step pairs (the delta method for a ratio of
means).

Nothing here knows a model: :class:`MicroBatchGradients` reads ``param.grad`` of any
parameter list after each micro-batch's backward, and :func:`adam_preconditioner` reads
any ``torch.optim.Adam``/``AdamW`` state. The accumulator itself is plain Python and
can be checkpointed (``state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MicroBatchGradients",
    "NoiseScale",
    "NoiseScaleEstimate",
    "adam_preconditioner",
    "step_estimates",
]

#: Adam's second-moment estimate is too young to precondition with before this many
#: optimiser steps (AdaptDL uses the same threshold); the identity is used instead.
ADAM_MIN_STEPS = 5


def step_estimates(
    micro_sqnorms: Sequence[float], mean_sqnorm: float, micro_batch: int
) -> tuple[float, float]:
    """One step's unbiased (|G|^2, tr(Sigma)) from ``k = len(micro_sqnorms)`` equal
    micro-batches of ``micro_batch`` examples and the squared norm of their mean."""
    k = len(micro_sqnorms)
    if k < 2:
        raise ValueError(f"need at least 2 micro-batches, got {k}")
    if not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise ValueError(f"micro batch must be a positive integer, got {micro_batch!r}")
    small = sum(micro_sqnorms) / k
    gradient_sq = (k * mean_sqnorm - small) / (k - 1)
    trace = micro_batch * k * (small - mean_sqnorm) / (k - 1)
    return gradient_sq, trace


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The accumulated statistics and their ratio, with standard errors."""

    gradient_sq: float
    """|G|^2, the true gradient's squared norm (in the preconditioned space if any)."""
    trace: float
    """tr(Sigma), the per-example gradient covariance's trace."""
    noise_scale: float
    """B_simple = trace / gradient_sq, in examples; inf when gradient_sq <= 0 (the
    gradient is not distinguishable from noise yet)."""
    noise_scale_stderr: float
    """Standard error of ``noise_scale`` over the steps (delta method); inf/nan when
    it cannot be told."""
    gradient_sq_stderr: float
    trace_stderr: float
    steps: float
    """Steps accumulated (the effective number under exponential decay)."""

    def to_dict(self) -> dict:
        return {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}

    @property
    def relative_stderr(self) -> float:
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            return math.inf
        return self.noise_scale_stderr / self.noise_scale


class NoiseScale:
    """Accumulates per-step (|G|^2, tr(Sigma)) pairs; numerator and denominator apart.

    ``decay`` None keeps plain running sums (every step weighs the same: the right
    thing over one measurement window); a value in (0, 1) weighs older steps by
    ``decay**age`` to follow a noise scale that drifts during training. Either way the
    ratio is taken of the weighted means, never averaged over per-step ratios.
    """

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not (0.0 < decay < 1.0):
            raise ValueError(f"decay must be in (0, 1) or None, got {decay!r}")
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        # Weighted sums: weights, squared weights, g, t, g^2, t^2, g*t.
        self._w = self._w2 = 0.0
        self._g = self._t = self._gg = self._tt = self._gt = 0.0
        self.skipped_steps = 0

    def add(self, gradient_sq: float, trace: float) -> bool:
        """Add one step's estimates; a non-finite pair is skipped (returns False)."""
        if not (math.isfinite(gradient_sq) and math.isfinite(trace)):
            self.skipped_steps += 1
            return False
        if self.decay is not None:
            d = self.decay
            self._w *= d
            self._w2 *= d * d
            self._g *= d
            self._t *= d
            self._gg *= d
            self._tt *= d
            self._gt *= d
        self._w += 1.0
        self._w2 += 1.0
        self._g += gradient_sq
        self._t += trace
        self._gg += gradient_sq * gradient_sq
        self._tt += trace * trace
        self._gt += gradient_sq * trace
        return True

    def update(self, micro_sqnorms: Sequence[float], mean_sqnorm: float, micro_batch: int) -> bool:
        """:func:`step_estimates` of one step, then :meth:`add`."""
        return self.add(*step_estimates(micro_sqnorms, mean_sqnorm, micro_batch))

    @property
    def steps(self) -> float:
        """The effective number of steps, (sum w)^2 / sum w^2 (the count without decay)."""
        return self._w * self._w / self._w2 if self._w2 > 0 else 0.0

    def estimate(self) -> NoiseScaleEstimate:
        if self._w == 0:
            raise ValueError("no step accumulated yet")
        n = self.steps
        g = self._g / self._w
        t = self._t / self._w
        # Unbiased weighted variances: with equal weights the usual 1/(n-1).
        correction = n / (n - 1) if n > 1 else math.inf
        var_g = max(self._gg / self._w - g * g, 0.0) * correction
        var_t = max(self._tt / self._w - t * t, 0.0) * correction
        cov = (self._gt / self._w - g * t) * correction
        if g > 0:
            ratio = t / g
            # Delta method: var(t/g) ~ var(t - R g) / (n g^2).
            var_r = max(var_t - 2 * ratio * cov + ratio * ratio * var_g, 0.0) / (n * g * g)
            stderr = math.sqrt(var_r) if math.isfinite(var_r) else math.inf
        else:
            ratio, stderr = math.inf, math.inf
        return NoiseScaleEstimate(
            gradient_sq=g,
            trace=t,
            noise_scale=ratio,
            noise_scale_stderr=stderr,
            gradient_sq_stderr=math.sqrt(var_g / n) if math.isfinite(var_g) else math.inf,
            trace_stderr=math.sqrt(var_t / n) if math.isfinite(var_t) else math.inf,
            steps=n,
        )

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "sums": [self._w, self._w2, self._g, self._t, self._gg, self._tt, self._gt],
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self._w, self._w2, self._g, self._t, self._gg, self._tt, self._gt = map(float, state["sums"])
        self.skipped_steps = int(state["skipped_steps"])


# -- reading gradients (torch) -------------------------------------------------------------

Preconditioner = Callable[[Any], Any]
"""``param -> tensor`` to divide that parameter's gradient by, or None for the identity."""


def adam_preconditioner(optimizer, min_steps: int = ADAM_MIN_STEPS) -> Preconditioner:
    """Adam's per-coordinate step scale: sqrt(v / (1 - beta2^t)) + eps, read from the
    optimiser's state (``exp_avg_sq``, ``step``). The identity for a parameter whose
    state is younger than ``min_steps`` (or absent): its second moment is not yet an
    estimate of anything.

    Dividing gradients by it measures the noise scale in the space Adam steps in
    (AdaptDL's ``AdamGradientNoiseScale`` does the same). Measured by
    ``benchmarks/gns_adam.py`` (docs/goodput.md), the *raw* noise scale predicted Adam's
    steps-to-target ratio between batch sizes better (mean |log error| 0.17 against
    0.43-0.49), so the goodput choice uses the raw one; this stays for comparison.
    """
    eps_of, beta2_of = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            eps_of[param] = group["eps"]
            beta2_of[param] = group["betas"][1]

    def precondition(param):
        state = optimizer.state.get(param) or {}
        step = state.get("step")
        if step is None or "exp_avg_sq" not in state:
            return None
        step = float(step)
        if step < min_steps:
            return None
        correction = 1.0 - beta2_of[param] ** step
        return (state["exp_avg_sq"] / correction).sqrt().add_(eps_of[param])

    return precondition


class MicroBatchGradients:
    """One step's micro-batch gradients of ``params``: their squared norms and the
    squared norm of their mean, optionally in a preconditioned space.

    Call :meth:`add` after each micro-batch's backward (gradients zeroed in between,
    each micro-batch's loss a mean over its own examples), then :meth:`finish`. Holds
    one fp32 copy of the gradient (the running sum); norms stay on the device until
    ``finish``, which syncs once.
    """

    def __init__(self, params: Iterable, preconditioner: Preconditioner | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.preconditioner = preconditioner
        self._scales = None
        self._sum = None
        self._sqnorms: list = []

    def _divisors(self) -> list:
        if self._scales is None:
            self._scales = [
                self.preconditioner(p) if self.preconditioner is not None else None
                for p in self.params
            ]
        return self._scales

    def _normalised(self, grad_scale: float) -> list:
        import torch

        grads = []
        for p, divisor in zip(self.params, self._divisors()):
            g = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float()
            if grad_scale != 1.0:
                g = g / grad_scale
            if divisor is not None:
                g = g / divisor
            grads.append(g)
        return grads

    def add(self, grad_scale: float = 1.0) -> None:
        """Read the current ``.grad`` of every parameter as one micro-batch's gradient
        (divided by ``grad_scale`` first, for losses scaled by a gradient scaler)."""
        import torch

        grads = self._normalised(grad_scale)
        self._sqnorms.append(_sqnorm(grads))
        if self._sum is None:
            self._sum = [g.clone() for g in grads]
        else:
            torch._foreach_add_(self._sum, grads)

    @property
    def micro_batches(self) -> int:
        return len(self._sqnorms)

    def finish(self) -> tuple[list[float], float]:
        """(squared norm of each micro-batch gradient, squared norm of their mean)."""
        import torch

        k = len(self._sqnorms)
        if k == 0:
            raise ValueError("no micro-batch gradient was added")
        mean = [s / k for s in self._sum]
        norms = torch.stack([*self._sqnorms, _sqnorm(mean)]).tolist()  # the one sync
        return norms[:-1], norms[-1]


def _sqnorm(tensors: list):
    import torch

    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t.double().pow(2).sum() for t in tensors]).sum()
