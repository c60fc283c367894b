"""Batch-size search: the largest batch that fits a memory target, then the best one.

The policy is a pure function over an injected ``trial(batch) -> TrialOutcome``: the
trial runs the real train step (and cleans up after an OOM); this module only decides
which batch to try next and which one to keep. Tests drive it with fake trials and
assert the exact sequence of batches tried.

Algorithm (``search_batch``)
----------------------------
A trial *succeeds* when it ran (``ok``) and its peak memory is at most
``limit = target_bytes - margin_bytes``; a run above the limit is recorded as a
failure with reason ``over_target``. A successful trial slower than
``trial_time_budget_s`` is kept (it is usable) but ends the search, because every
trial after it would be larger and slower still; a failed slow trial is an ordinary
failure, since every trial after a failure is smaller. Past-the-peak searches (below)
also look ahead: a trial whose predicted time (the largest success's seconds scaled
by the batch ratio, with a 25 % margin: a large batch also pays more to build and
allocate) exceeds the budget is not started, and the search ends with the batches it
has: "batch 128 would take about 31 s > budget 25 s (batch 64 took 12.3 s)".

1. The first trial is at ``start``. If it fails, :class:`SearchError`: there is
   nothing to choose from, and shrinking below what the user asked for would hide
   the problem.
2. Growth: double the last success (clamped at ``max_batch``) until a trial fails or
   ``max_batch`` succeeds. Growth only ever tries batches larger than all before it.
3. Bisection between ``lo`` (largest success) and ``hi`` (smallest failure): try
   ``(lo + hi) // 2`` until ``hi - lo <= resolution(lo)``. Every bisection trial lies
   strictly inside the bracket, so no batch is tried twice and the bracket always
   shrinks. ``resolution`` is 1 below batch 64 and 5 % above: near 1000, pinning the
   exact edge would cost trials for a difference throughput cannot see.
4. Linear fit (``use_fit``): with two or more successes carrying a peak reading,
   ``peak = fixed + per_sample * batch`` is fitted by least squares (exact rational
   arithmetic, so the prediction is reproducible) and predicts
   ``b* = floor((limit - fixed) / per_sample)``. A fit with ``per_sample <= 0``
   (noisy, non-monotonic readings) predicts nothing. The prediction only ever
   *proposes* a trial, marked ``predicted``; it is never trusted blind:

   - during growth, if ``lo < b* < min(2 * lo, max_batch)``, try ``b*`` instead of
     ``2 * lo``;
   - during bisection, if ``lo < b* < hi``, try ``b*`` instead of the midpoint;
   - after a predicted trial at ``b*`` succeeds, try ``b* + resolution(b*)`` at once
     (also marked ``predicted``) to confirm that the edge is there. A good prediction
     thus closes the bracket in two trials.

   The fit gets one chance: once it is shown wrong (``b*`` fails, or the
   confirmation succeeds) the rest of the search is plain doubling and bisection. A
   fit that does not describe this memory curve thus costs at most two trials, never
   a chase after a model.
5. Past the peak (every objective but ``memory``, unless ``find_edge``): the search
   stops once the ``stop_patience`` largest successful batches all lie above the
   batch with the best *score* and all score *clearly below* it
   (:func:`peak_passed`). Clearly below means at least ``decline_tolerance`` below
   the best, and with the two trials' 95 % confidence intervals apart
   (``images_per_s_rel_ci``, when the trial measured one, each at least
   ``noise_floor`` wide: a trial's own interval misses the drift between trials on a
   shared machine): a drop inside the noise is not a decline. One dip that a larger
   batch recovers from does not stop the search; two successive declines do. Growth
   and bisection trials count alike (both lie above every success before them). Those trials could not change the
   answer, since the choice takes the best score and larger batches past its peak
   only score lower; so the memory edge is left unsearched and the stop reason says
   so ("memory edge not searched: throughput peaked at 64; ..."). The score is
   images/s by default; any :class:`Score` (goodput: images/s times statistical
   efficiency) works the same way, because the rule only reads the score.
   Diminishing returns (same condition of objective): the search also stops once the
   ``stop_patience`` largest successful batches together raised the best score by
   less than ``min_gain`` (5 %) over the best of the smaller batches
   (:func:`plateau_reached`): a flat curve (48x48 crops on a CPU: 34, 36, 34, 36
   images/s from batch 8 to 64) would otherwise be grown to the memory edge one
   ever slower trial at a time, for at most a few per cent. A dip that a larger batch
   recovers from keeps the search going only when the recovery is a clear gain; the
   choice among what was measured is the same either way (below). The stop reason
   says "... flat past 16; batch 32, 64 within 5 % of it".
6. The search also stops after ``max_trials`` trials, whatever the phase.
7. Cut short before the curve turned down: when time (the trial budget or its
   look-ahead) or ``max_trials`` ends the *growth* (no failure yet, below
   ``max_batch``) while the largest batch tried still scores within noise of the best
   (not :func:`clearly_below` it), the answer may lie further up: the result names the
   batch growth would have tried next (``untried``, every objective but ``memory``),
   provided it is predicted to fit. The prediction is the largest success's peak
   scaled by the batch ratio (``peak * next / lo``), an upper bound whenever the fixed
   part of the memory is not negative, so no fit is trusted. The search never runs it; the tuner's runoff measures it end to end,
   which costs a few steps rather than a trial (48x48 crops on 2 cores: batch 32
   took 10.5 s, so the look-ahead did not start 64, the grid's best).

The chosen batch (``choose_batch``): objective ``memory`` keeps the largest success;
any other keeps the largest success whose score (images/s for ``throughput``) is not
:func:`clearly_below` the best measured (within ``throughput_tolerance``, or with the
two trials' confidence intervals overlapping): a difference that small is measurement
noise, and among equally good batches the largest needs the fewest optimizer steps.
The tuner then re-measures the close ones end to end (the runoff, below), where a
smaller batch must win clearly to replace it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any, Callable, Iterable

from autotune.errors import ConfigError

from autotune.memory import format_bytes

__all__ = [
    "OBJECTIVES",
    "REASONS",
    "RUNOFF_MARGIN",
    "THROUGHPUT",
    "Score",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "TrialOutcome",
    "choose_batch",
    "clearly_below",
    "fit_peak_memory",
    "peak_passed",
    "plateau_reached",
    "resolution",
    "runoff_batches",
    "runoff_label",
    "runoff_winner",
    "search_batch",
]

#: Why a trial ended: ``ok``; ``oom`` (allocation failed); ``over_target`` (ran, but
#: peak memory above the limit: set by the search); ``too_slow`` (the trial itself gave
#: up past its time budget); ``error`` (any other failure the trial chose to report).
REASONS = ("ok", "oom", "over_target", "too_slow", "error")

#: What "best batch" means: the fastest (within tolerance, largest wins) or the largest.
OBJECTIVES = ("throughput", "memory")


#: The look-ahead's margin on a trial's predicted time: larger batches also pay more to
#: build and allocate (measured on 48x48 crops on 2 cores: batch 64 took 12.3 s, batch
#: 120 took 27.5 s, 2.24x the time for 1.875x the batch).
LOOK_AHEAD_MARGIN = 1.25


def resolution(batch: int) -> int:
    """How close the bisection must bracket the edge above ``batch``.

    Exact (1) below 64, where one sample is a visible share of the batch; 5 %
    (``ceil(batch / 20)``, in integers) above.
    """
    return 1 if batch < 64 else -(-batch // 20)


@dataclass(frozen=True)
class Score:
    """What an objective maximises over successful trials, and its name for messages.

    ``value(outcome)`` returns a number (higher is better) or None when the trial
    measured nothing to score. Its relative uncertainty is taken to be the trial's
    ``images_per_s_rel_ci``: right for images/s and for any score that is images/s
    times a factor known without noise (goodput's statistical efficiency at a batch).
    """

    name: str
    value: Callable[[TrialOutcome], float | None]


def _images_per_s(outcome: TrialOutcome) -> float | None:
    return outcome.images_per_s


#: The default score: measured training images/s.
THROUGHPUT = Score("throughput", _images_per_s)


def _scored(trials: Iterable[TrialOutcome], score: Score,
            noise_floor: float = 0.0) -> list[tuple[TrialOutcome, float, float]]:
    """(trial, score, relative half-width) for each trial that has a score: the trial's
    own 95 % half-width, or ``noise_floor`` when that is wider (or the trial has none):
    see :attr:`SearchConfig.noise_floor`."""
    scored = []
    for t in trials:
        value = score.value(t)
        if value is not None:
            scored.append((t, value, max(t.images_per_s_rel_ci or 0.0, noise_floor)))
    return scored


def _best(scored: list[tuple[TrialOutcome, float, float]]) -> tuple[TrialOutcome, float, float]:
    """The best-scoring item of :func:`_scored` (ties: the larger batch)."""
    return max(scored, key=lambda item: (item[1], item[0].batch))


@dataclass
class TrialOutcome:
    """What one trial of the train step at one batch size measured."""

    batch: int
    ok: bool
    """True when the step ran (and, once classified by the search, fitted the limit)."""
    peak_bytes: int | None
    """Peak memory the process held during the trial; None when not measured (OOM)."""
    images_per_s: float | None
    """Training throughput; None when the trial did not complete."""
    seconds: float
    """Wall-clock duration of the trial, compared with the time budget."""
    reason: str
    """One of :data:`REASONS`; ``ok`` exactly when ``ok`` is True."""
    detail: str = ""
    """Human-readable context: the exception text for ``oom``/``error``, the numbers
    for ``over_target``."""
    predicted: bool = False
    """True when the linear memory fit proposed this batch (not doubling/bisection)."""
    images_per_s_rel_ci: float | None = None
    """Half-width of the 95 % confidence interval of ``images_per_s``, relative to it
    (0.03: +-3 %); None when the trial timed a fixed number of steps without one."""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(
                f"trial reason must be one of {', '.join(REASONS)}, got {self.reason!r}"
            )
        if self.ok != (self.reason == "ok"):
            raise ValueError(
                f"trial at batch {self.batch}: ok={self.ok} contradicts reason {self.reason!r}"
            )
        ci = self.images_per_s_rel_ci
        if ci is not None and not (_is_number(ci) and 0 <= ci < math.inf):
            raise ValueError(f"trial at batch {self.batch}: confidence interval {ci!r} is not >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialOutcome:
        return cls(**_known_fields(cls, data))


@dataclass
class SearchConfig:
    """How the batch-size search runs; validated here so a bad value fails before any trial."""

    target_bytes: int
    """Peak memory the training process may reach."""
    margin_bytes: int = 0
    """Kept free below the target: trials must peak at or below ``target - margin``.
    Covers what a trial does not see (longer runs fragment the allocator, evaluation
    steps, a checkpoint save)."""
    start: int = 1
    """First batch tried; it must fit, or the search raises :class:`SearchError`."""
    max_batch: int = 4096
    """No trial is larger; reaching it successfully ends the search."""
    max_trials: int = 20
    """Hard cap on trials, whatever the phase."""
    trial_time_budget_s: float | None = None
    """A successful trial longer than this ends the search (None: no limit)."""
    objective: str = "throughput"
    """One of :data:`OBJECTIVES`: how the batch is chosen among successes."""
    throughput_tolerance: float = 0.03
    """For ``throughput``: the largest batch within this fraction of the best images/s wins."""
    use_fit: bool = True
    """Let a linear fit of peak memory over batch propose trials (always verified)."""
    find_edge: bool = False
    """Search the memory edge even after the score has peaked (objective ``memory``
    always does): for a user who wants the edge on record."""
    stop_patience: int = 2
    """Past the peak: this many successive larger batches must score clearly below the
    best before the search stops (1 would let one noisy trial end it)."""
    decline_tolerance: float = 0.05
    """Past the peak: a score this fraction below the best (or more, when the
    confidence intervals demand it) counts as clearly below."""
    min_gain: float = 0.05
    """Diminishing returns: the last ``stop_patience`` batches must raise the best score
    by at least this fraction, or the search stops (0: never stop on a plateau)."""
    noise_floor: float = 0.0
    """The narrowest relative half-width a trial's score is given when two trials are
    compared (``clearly_below`` in the stop rule, the choice and the runoff's
    candidates). A trial's own interval describes its samples only; two trials of the
    same batch run a few seconds apart on a shared machine differ by more (2 CPU
    cores: 10-13 % between-trial standard deviation against a median own interval
    of 3-7 %, ``benchmarks/trial_noise.py``). 0: trust the trials' own intervals."""

    def __post_init__(self) -> None:
        _require(_is_int(self.target_bytes) and self.target_bytes > 0,
                 f"target memory must be a positive number of bytes, got {self.target_bytes!r}")
        _require(_is_int(self.margin_bytes) and 0 <= self.margin_bytes < self.target_bytes,
                 f"memory margin must be at least 0 and below the target "
                 f"({format_bytes(self.target_bytes)}), got {self.margin_bytes!r}")
        _require(_is_int(self.start) and self.start >= 1,
                 f"start batch must be an integer >= 1, got {self.start!r}")
        _require(_is_int(self.max_batch) and self.max_batch >= self.start,
                 f"max batch must be an integer >= the start batch {self.start}, "
                 f"got {self.max_batch!r}")
        _require(_is_int(self.max_trials) and self.max_trials >= 1,
                 f"max trials must be an integer >= 1, got {self.max_trials!r}")
        budget = self.trial_time_budget_s
        _require(budget is None or (_is_number(budget) and 0 < budget < math.inf),
                 f"trial time budget must be a positive number of seconds, got {budget!r}")
        _require(self.objective in OBJECTIVES,
                 f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _require(_is_number(self.throughput_tolerance) and 0 <= self.throughput_tolerance < 1,
                 f"throughput tolerance must be in [0, 1), got {self.throughput_tolerance!r}")
        _require(isinstance(self.use_fit, bool),
                 f"use_fit must be true or false, got {self.use_fit!r}")
        _require(isinstance(self.find_edge, bool),
                 f"find_edge must be true or false, got {self.find_edge!r}")
        _require(_is_int(self.stop_patience) and self.stop_patience >= 1,
                 f"stop patience must be an integer >= 1, got {self.stop_patience!r}")
        _require(_is_number(self.decline_tolerance) and 0 <= self.decline_tolerance < 1,
                 f"decline tolerance must be in [0, 1), got {self.decline_tolerance!r}")
        _require(_is_number(self.min_gain) and 0 <= self.min_gain < 1,
                 f"minimum gain must be in [0, 1), got {self.min_gain!r}")
        _require(_is_number(self.noise_floor) and 0 <= self.noise_floor < 1,
                 f"noise floor must be in [0, 1), got {self.noise_floor!r}")

    @property
    def stops_past_peak(self) -> bool:
        """Does the search stop once the score has peaked (see :func:`peak_passed`)?"""
        return self.objective != "memory" and not self.find_edge

    @property
    def limit_bytes(self) -> int:
        """The peak a successful trial may reach: target minus margin."""
        return self.target_bytes - self.margin_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        try:
            return cls(**_known_fields(cls, data))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SearchConfig: {exc}") from None


class SearchError(RuntimeError):
    """The start batch does not fit: there is no batch to choose."""

    def __init__(self, outcome: TrialOutcome) -> None:
        super().__init__(f"batch {outcome.batch} does not fit: {outcome.reason}: {outcome.detail}")
        self.outcome = outcome


@dataclass
class SearchResult:
    """The full record of a search: every trial in the order run, and the decision."""

    trials: list[TrialOutcome]
    chosen: int
    stop_reason: str
    """Why the search stopped, in words (shown in the table)."""
    fit: tuple[float, float] | None = None
    """(fixed_bytes, per_sample_bytes) over the successful trials; None when fewer than
    two readings or a non-positive slope. Reported even when ``use_fit`` is off: it
    costs nothing and explains the memory curve."""
    peak_batch: int | None = None
    """Set when the search stopped past the score's peak, at this batch: the memory
    edge was not searched."""
    untried: int | None = None
    """The batch growth would have tried next, when time or the trial count cut it
    short while the largest batch still scored within noise of the best, and that
    batch is predicted to fit (step 7 of the module docstring); None otherwise."""

    def successes(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.ok]

    def success_at(self, batch: int) -> TrialOutcome | None:
        """The latest successful trial at ``batch``; None when the search ran none."""
        return next((t for t in reversed(self.trials) if t.batch == batch and t.ok), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [t.to_dict() for t in self.trials],
            "chosen": self.chosen,
            "stop_reason": self.stop_reason,
            "fit": None if self.fit is None else list(self.fit),
            "peak_batch": self.peak_batch,
            "untried": self.untried,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        fit = data.get("fit")
        return cls(
            trials=[TrialOutcome.from_dict(t) for t in data["trials"]],
            chosen=data["chosen"],
            stop_reason=data["stop_reason"],
            fit=None if fit is None else (float(fit[0]), float(fit[1])),
            peak_batch=data.get("peak_batch"),  # absent from files written before it existed
            untried=data.get("untried"),
        )


def fit_peak_memory(trials: Iterable[TrialOutcome]) -> tuple[float, float] | None:
    """Least-squares ``peak = fixed + per_sample * batch`` over successful trials.

    None with fewer than two distinct batches carrying a peak reading, or when the
    slope is not positive (readings too noisy to say anything about the edge).
    """
    fit = _exact_fit(trials)
    return None if fit is None else (float(fit[0]), float(fit[1]))


def choose_batch(
    trials: Iterable[TrialOutcome], objective: str, tolerance: float, score: Score | None = None,
    noise_floor: float = 0.0,
) -> int:
    """The batch to train with, among the successful trials (see the module docstring).

    ``score`` (default :data:`THROUGHPUT`) ranks the successes for every objective but
    ``memory``. When no success has a score, falls back to the largest success: memory
    is then the only evidence there is.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    successes = [t for t in trials if t.ok]
    if not successes:
        raise ValueError("no successful trial to choose a batch from")
    scored = _scored(successes, score or THROUGHPUT, noise_floor)
    if objective == "memory" or not scored:
        return max(t.batch for t in successes)
    _, best, best_ci = _best(scored)
    return max(t.batch for t, value, ci in scored
               if not clearly_below(value, ci, best, best_ci, tolerance))


def runoff_batches(
    trials: Iterable[TrialOutcome], chosen: int, score: Score | None = None,
    tolerance: float = 0.03, limit: int = 2, noise_floor: float = 0.0,
) -> list[int]:
    """The batches the search could not tell apart: ``chosen`` first, then, by score,
    up to ``limit - 1`` other successes whose score is not :func:`clearly_below` the
    best (beyond both the tolerance and the two confidence intervals).

    On a flat curve (images/s within a few per cent from batch 32 to 128, each trial
    +-10 % on a loaded CPU) the search's own choice among those is a coin toss; the
    tuner re-measures them end to end, in alternation, before choosing
    (:func:`runoff_winner`). ``[chosen]`` alone when nothing else is that close, or
    when ``chosen`` has no score (the memory objective, a trial without a rate).
    """
    if limit < 1:
        raise ConfigError(f"runoff limit must be at least 1, got {limit!r}")
    latest: dict[int, TrialOutcome] = {}
    for t in trials:
        if t.ok:
            latest[t.batch] = t
    scored = _scored(list(latest.values()), score or THROUGHPUT, noise_floor)
    if chosen not in {t.batch for t, _, _ in scored}:
        return [chosen]
    _, best, best_ci = _best(scored)
    close = sorted(((value, t.batch) for t, value, ci in scored
                    if t.batch != chosen and not clearly_below(value, ci, best, best_ci, tolerance)),
                   reverse=True)
    return [chosen] + [batch for _, batch in close[:limit - 1]]


#: How much better (a fraction) a challenger must score in the runoff to replace the
#: search's choice. Each end-to-end reading on the shared 2-core machine varies by
#: +-10-15 % between rounds; the search's choice carries its own rule (the largest
#: batch within noise under throughput, the smallest under goodput), which a runoff of
#: two or three rounds should overturn only on clear evidence.
RUNOFF_MARGIN = 0.05


def runoff_label(batch: int, channels_last: bool = False) -> str:
    """A runoff candidate's name in the record and the report: "batch 64",
    "batch 128 channels_last"."""
    return f"batch {batch}" + (" channels_last" if channels_last else "")


def runoff_winner(scores: dict, incumbent, margin: float = RUNOFF_MARGIN):
    """The runoff's configuration (a key of ``scores``: a batch, or the tuner's (batch,
    channels_last)): the best-scoring challenger when it beats ``incumbent`` (the
    search's choice) by more than ``margin``; else ``incumbent``. Each score is the
    median of alternated, end-to-end rounds (under goodput times the batch's
    efficiency); key order breaks an exact tie (the larger batch). An incumbent without
    a score (it did not fit end to end) loses to the best challenger."""
    if not scores:
        raise ValueError("no runoff score to choose from")
    if incumbent not in scores:
        return max(scores, key=lambda key: (scores[key], key))
    challengers = {k: v for k, v in scores.items() if k != incumbent}
    if not challengers:
        return incumbent
    best = max(challengers, key=lambda key: (challengers[key], key))
    return best if challengers[best] > (1 + margin) * scores[incumbent] else incumbent


def clearly_below(
    value: float, value_ci: float, best: float, best_ci: float, tolerance: float
) -> bool:
    """Is ``value`` below ``best`` by more than noise?

    Both conditions: at least ``tolerance`` (a fraction) below, and the two 95 %
    confidence intervals apart (``value * (1 + value_ci) < best * (1 - best_ci)``, the
    ``_ci`` being relative half-widths, 0 when unknown).
    """
    return value < (1 - tolerance) * best and value * (1 + value_ci) < best * (1 - best_ci)


def peak_passed(
    trials: Iterable[TrialOutcome],
    score: Score | None = None,
    patience: int = 2,
    tolerance: float = 0.05,
    noise_floor: float = 0.0,
) -> int | None:
    """The batch where ``score`` peaked, once the search is past it; None before.

    Past the peak means: the ``patience`` largest successful batches with a score all
    lie above the best-scoring batch (ties: the larger) and all score
    :func:`clearly_below` it. A batch past the peak that scores within noise of the
    best (a recovery) keeps the search going. Failed trials say nothing about the
    score and are ignored.
    """
    scored = sorted(_scored([t for t in trials if t.ok], score or THROUGHPUT, noise_floor),
                    key=lambda item: item[0].batch)
    if len(scored) <= patience:
        return None
    peak, best, best_ci = _best(scored)
    tail = scored[-patience:]
    if all(t.batch > peak.batch and clearly_below(value, ci, best, best_ci, tolerance)
           for t, value, ci in tail):
        return peak.batch
    return None


def plateau_reached(
    trials: Iterable[TrialOutcome],
    score: Score | None = None,
    patience: int = 2,
    min_gain: float = 0.05,
) -> int | None:
    """The batch the score went flat after, once the search is on a plateau; None before.

    On a plateau means: the ``patience`` largest successful batches with a score
    together raised the best score by less than ``min_gain`` over the best of the
    smaller batches (the returned batch). A ``min_gain`` of 0 never reports one.
    Failed trials say nothing about the score and are ignored.
    """
    if min_gain <= 0:
        return None
    scored = sorted(_scored([t for t in trials if t.ok], score or THROUGHPUT),
                    key=lambda item: item[0].batch)
    if len(scored) <= patience:
        return None
    before, tail = scored[:-patience], scored[-patience:]
    base, base_value, _ = max(before, key=lambda item: (item[1], item[0].batch))
    if base_value > 0 and all(value < (1 + min_gain) * base_value for _, value, _ in tail):
        return base.batch
    return None


def search_batch(
    trial: Callable[[int], TrialOutcome], cfg: SearchConfig, score: Score | None = None
) -> SearchResult:
    """Find the batch size to train with; see the module docstring for the algorithm.

    ``trial(batch)`` must return a :class:`TrialOutcome` for that batch (catching OOM
    itself); an exception it lets through ends the search unchanged. ``score``
    (default :data:`THROUGHPUT`) is what the choice and the past-the-peak stop
    maximise; objective ``memory`` ignores it.
    """
    return _Search(trial, cfg, score or THROUGHPUT).run()


class _Search:
    """State of one search: the trials so far and whether the fit is still trusted."""

    def __init__(self, trial: Callable[[int], TrialOutcome], cfg: SearchConfig,
                 score: Score) -> None:
        self.trial = trial
        self.cfg = cfg
        self.score = score
        self.trials: list[TrialOutcome] = []
        self.fit_trusted = cfg.use_fit
        self.peak_batch: int | None = None
        self.cut_short = False  # time or the trial count ended the search, not the curve

    def run(self) -> SearchResult:
        cfg = self.cfg
        first = self._try(cfg.start, predicted=False)
        if not first.ok:
            raise SearchError(first)
        lo, hi = cfg.start, None  # largest success, smallest failure (None: still growing)
        confirm = False  # the next trial confirms a successful prediction at lo
        while True:
            stop_reason = self._stop_reason(lo, hi)
            if stop_reason is not None:
                break
            batch, predicted = self._next_batch(lo, hi, confirm)
            stop_reason = self._too_slow_ahead(batch)
            if stop_reason is not None:
                break
            outcome = self._try(batch, predicted)
            if outcome.ok:
                lo = batch
            else:
                hi = batch
            if predicted and outcome.ok == confirm:
                # b* failed (the fit overshot) or b* + resolution fitted (it undershot).
                self.fit_trusted = False
            confirm = predicted and not confirm and outcome.ok
        return SearchResult(
            trials=self.trials,
            chosen=choose_batch(self.trials, cfg.objective, cfg.throughput_tolerance, self.score,
                                cfg.noise_floor),
            stop_reason=stop_reason,
            fit=fit_peak_memory(self.trials),
            peak_batch=self.peak_batch,
            untried=self._untried(lo) if self.cut_short and hi is None else None,
        )

    def _stop_reason(self, lo: int, hi: int | None) -> str | None:
        cfg = self.cfg
        last = self.trials[-1]
        budget = cfg.trial_time_budget_s
        if last.ok and budget is not None and last.seconds > budget:
            self.cut_short = True
            return f"trial at batch {last.batch} took {last.seconds:.3g} s > budget {budget:.3g} s"
        if hi is None and lo == cfg.max_batch:
            return f"reached max batch {cfg.max_batch}"
        if hi is not None and hi - lo <= resolution(lo):
            failed = next(t for t in self.trials if t.batch == hi)
            return f"hit target between {lo} and {hi} (batch {hi}: {failed.reason})"
        if cfg.stops_past_peak:
            peak = peak_passed(self.trials, self.score, cfg.stop_patience, cfg.decline_tolerance,
                               cfg.noise_floor)
            flat = None if peak is not None else plateau_reached(
                self.trials, self.score, cfg.stop_patience, cfg.min_gain)
            if peak is not None or flat is not None:
                self.peak_batch = peak if peak is not None else flat
                scored = _scored([t for t in self.trials if t.ok], self.score)
                tail = ", ".join(map(str, sorted(t.batch for t, _, _ in scored)[-cfg.stop_patience:]))
                how = (f"peaked at {peak}; batch {tail} clearly below" if peak is not None else
                       f"flat past {flat}; batch {tail} within {cfg.min_gain * 100:g} % of it")
                return f"memory edge not searched: {self.score.name} {how}"
        if len(self.trials) >= cfg.max_trials:
            self.cut_short = True
            return f"trial budget exhausted ({cfg.max_trials} trials)"
        return None

    def _too_slow_ahead(self, batch: int) -> str | None:
        """Past-the-peak searches: why the trial at ``batch`` is not worth starting (its
        time, predicted from the largest success below it, exceeds the budget)."""
        cfg = self.cfg
        budget = cfg.trial_time_budget_s
        if budget is None or not cfg.stops_past_peak:
            return None
        below = [t for t in self.trials if t.ok and t.batch < batch]
        if not below:
            return None
        last = max(below, key=lambda t: t.batch)
        predicted = LOOK_AHEAD_MARGIN * last.seconds * batch / last.batch
        if predicted > budget:
            self.cut_short = True
            return (f"batch {batch} would take about {predicted:.3g} s > budget {budget:.3g} s "
                    f"(batch {last.batch} took {last.seconds:.3g} s)")
        return None

    def _untried(self, lo: int) -> int | None:
        """Step 7: the next growth batch above ``lo`` (the largest success), when the
        score there is not clearly below the best and the batch is predicted to fit;
        else None."""
        cfg = self.cfg
        if cfg.objective == "memory" or lo >= cfg.max_batch:
            return None
        scored = _scored([t for t in self.trials if t.ok], self.score, cfg.noise_floor)
        top = [item for item in scored if item[0].batch == lo]
        if not top:
            return None
        _, best, best_ci = _best(scored)
        _, value, ci = top[0]
        if clearly_below(value, ci, best, best_ci, cfg.throughput_tolerance):
            return None
        peak = next(t.peak_bytes for t in self.trials if t.ok and t.batch == lo)
        batch = min(2 * lo, cfg.max_batch)
        if peak is None or peak * batch > cfg.limit_bytes * lo:
            return None
        return batch

    def _next_batch(self, lo: int, hi: int | None, confirm: bool) -> tuple[int, bool]:
        """The next batch to try and whether the fit proposed it.

        Every answer lies strictly above ``lo`` and strictly below ``hi`` (or at most
        ``max_batch`` while growing), hence never repeats a trial.
        """
        cfg = self.cfg
        if confirm:
            # Below hi: otherwise hi - lo <= resolution(lo) and the search has stopped.
            return min(lo + resolution(lo), cfg.max_batch), True
        plain = min(2 * lo, cfg.max_batch) if hi is None else (lo + hi) // 2
        upper = plain if hi is None else hi
        predicted = self._prediction()
        if predicted is not None and lo < predicted < upper:
            return predicted, True
        return plain, False

    def _prediction(self) -> int | None:
        if not self.fit_trusted:
            return None
        fit = _exact_fit(self.trials)
        if fit is None:
            return None
        fixed, per_sample = fit
        return math.floor((self.cfg.limit_bytes - fixed) / per_sample)

    def _try(self, batch: int, predicted: bool) -> TrialOutcome:
        """Run the trial, classify it against the limit, record and return it."""
        outcome = self.trial(batch)
        if outcome.batch != batch:
            raise ValueError(
                f"trial asked for batch {batch} returned an outcome for batch {outcome.batch}"
            )
        outcome = replace(outcome, predicted=predicted)
        limit = self.cfg.limit_bytes
        if outcome.ok and outcome.peak_bytes is not None and outcome.peak_bytes > limit:
            outcome = replace(outcome, ok=False, reason="over_target",
                              detail=self._over_detail(outcome.peak_bytes))
        self.trials.append(outcome)
        return outcome

    def _over_detail(self, peak_bytes: int) -> str:
        cfg = self.cfg
        if cfg.margin_bytes:
            return (f"peak {format_bytes(peak_bytes)} above the limit "
                    f"{format_bytes(cfg.limit_bytes)} (target {format_bytes(cfg.target_bytes)} "
                    f"- margin {format_bytes(cfg.margin_bytes)})")
        return f"peak {format_bytes(peak_bytes)} above the target {format_bytes(cfg.target_bytes)}"


def _exact_fit(trials: Iterable[TrialOutcome]) -> tuple[Fraction, Fraction] | None:
    points = [(t.batch, t.peak_bytes) for t in trials if t.ok and t.peak_bytes is not None]
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    sum_b = sum(b for b, _ in points)
    sum_p = sum(p for _, p in points)
    sum_bb = sum(b * b for b, _ in points)
    sum_bp = sum(b * p for b, p in points)
    per_sample = Fraction(n * sum_bp - sum_b * sum_p, n * sum_bb - sum_b * sum_b)
    if per_sample <= 0:
        return None
    fixed = (sum_p - per_sample * sum_b) / n
    return fixed, per_sample


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys: a typo in a saved file must not pass silently."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    return data


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
