"""Rich tables and the optional plot for a tuning run. Presentation only: every figure
shown here was measured by the tuner and is read from its result."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from autotune.errors import UserError
from autotune.console import say, warn
from autotune.memory import format_bytes
from autotune.search import RUNOFF_MARGIN, runoff_label
from autotune.tuned import TunedChoice
from autotune.tuner import TuneResult
from autotune.workload import Baseline


def _baseline(result: TuneResult) -> Baseline:
    """The baseline the run compared against, from the tuned file's workload record."""
    record = result.tuned.workload.get("baseline") or {}
    try:
        return Baseline(**record)
    except TypeError:
        return Baseline()


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _fmt_rate_ci(value: float | None, rel_ci: float | None, converged: bool = True) -> str:
    """'123.4 ±2 %': the rate and its 95 % interval; '~' marks a timing that hit a
    ceiling before the interval met the tolerance."""
    if value is None:
        return "-"
    text = _fmt_rate(value)
    if rel_ci is not None:
        text += f" ±{100 * rel_ci:.0f} %"
    return text + ("" if converged else " ~")


def machine_table(machine: dict) -> Table:
    table = Table(title="Machine", show_header=False, title_justify="left")
    host, torch_info, gpu = machine["host"], machine["torch"], machine.get("gpu")
    table.add_row("device", machine["device"])
    if gpu:
        table.add_row("GPU", f"{gpu['name']} ({format_bytes(gpu['total_bytes'])}, "
                      f"{format_bytes(gpu['used_bytes'])} used, driver {gpu['driver_version']})")
        if gpu.get("other_processes_bytes"):
            table.add_row("other processes", format_bytes(gpu["other_processes_bytes"]))
        table.add_row("CUDA context", format_bytes(machine["context_bytes"]))
    table.add_row("CPU", f"{host['cpu_name']}: {host['usable_cores']} usable of {host['logical_cores']} cores")
    table.add_row("RAM", f"{format_bytes(host['ram_available_bytes'])} available of {format_bytes(host['ram_total_bytes'])}")
    table.add_row("torch", f"{torch_info['torch_version']}" + (f", CUDA {torch_info['cuda_version']}" if torch_info.get("cuda_version") else ""))
    return table


def precision_table(result: TuneResult) -> Table:
    table = Table(title="Precision (reference batch)", title_justify="left")
    for column in ("precision", "images/s", "peak memory", "losses finite", "note"):
        table.add_column(column)
    chosen = result.tuned.choice.precision
    for m in result.precision:
        table.add_row(
            m.precision + (" *" if m.precision == chosen else ""),
            _fmt_rate(m.images_per_s),
            format_bytes(m.peak_bytes) if m.peak_bytes else "-",
            "yes" if m.finite else "no",
            m.error,
        )
    return table


def trials_table(result: TuneResult) -> Table:
    table = Table(title=f"Batch search ({result.search.stop_reason})", title_justify="left")
    for column in ("#", "batch", "peak memory", "% of target", "images/s", "s", "outcome"):
        table.add_column(column, justify="right" if column not in ("outcome",) else "left")
    stops = {}
    for m in result.tuned.measurements.get("trials", []):
        stops.setdefault(m.get("batch"), m.get("timing_stop", ""))
    chosen = searched_batch(result)
    for i, t in enumerate(result.search.trials, 1):
        converged = stops.get(t.batch, "converged") in ("converged", "")
        pct = f"{100 * t.peak_bytes / result.target_bytes:.0f} %" if t.peak_bytes else "-"
        outcome = t.reason + (" (fit)" if t.predicted else "") + (f": {t.detail}" if t.detail and not t.ok else "")
        mark = " *" if t.batch == chosen else ""
        table.add_row(str(i), f"{t.batch}{mark}", format_bytes(t.peak_bytes) if t.peak_bytes else "-",
                      pct, _fmt_rate_ci(t.images_per_s, t.images_per_s_rel_ci, converged),
                      f"{t.seconds:.1f}", outcome)
    if result.search.peak_batch is not None:
        table.caption = ("larger batches were not tried: they could not change the answer "
                         "(--find-edge searches the memory edge anyway)")
    elif result.search.untried is not None:
        score = "goodput" if result.tuned.choice.objective == "goodput" else "images/s"
        table.caption = (f"cut short before {score} turned down: batch "
                         f"{result.search.untried} goes to the runoff, end to end")
    return table


def searched_batch(result: TuneResult) -> int:
    """The batch the tuning settled on: the runoff's winner when there was one, else the
    search's choice (before the verdict, which may fall back to the baseline)."""
    runoff = (result.tuned.measurements.get("comparison") or {}).get("runoff")
    return runoff["chosen"] if runoff else result.search.chosen


def runoff_line(measurements: dict) -> str | None:
    """'runoff of the search's choice against what it could not tell apart, end to end
    in 2 alternated rounds (images/s): batch 64 130.6, batch 16 98.8, batch 64
    channels_last 133.0: the search's choice (batch 64) stands (...)' (None without a
    runoff)."""
    runoff = (measurements.get("comparison") or {}).get("runoff")
    if not runoff:
        return None
    rounds = max((len(r) for r in runoff["rounds"].values()), default=0)
    untried = runoff.get("untried")
    beyond = {runoff_label(untried, cl) for cl in (False, True)} if untried is not None else set()

    def named(name: str) -> str:
        return f"{name} (not reached by the search)" if name in beyond else name

    scores = ", ".join(f"{named(name)} {_fmt_rate(runoff['scores'][name])}" if name in runoff["scores"]
                       else f"{named(name)} did not fit" for name in runoff["rounds"])
    incumbent = runoff_label(runoff["search_chosen"], runoff.get("channels_last", False))
    kept = runoff_label(runoff["chosen"], runoff.get("chosen_channels_last", False))
    why = (f"the search's choice ({incumbent}) stands (a challenger must win by more than "
           f"{100 * RUNOFF_MARGIN:g} %)" if kept == incumbent else f"{kept} wins")
    against = "what it could not tell apart" + (" and the batch it did not reach" if beyond else "")
    return (f"runoff of the search's choice against {against}, end to end "
            f"in {rounds} alternated rounds ({runoff['score']}): {scores}: {why}")


def noise_table(result: TuneResult) -> Table | None:
    """The gradient noise scale (objective goodput); None when it was not measured."""
    noise = result.tuned.measurements.get("noise_scale")
    if not noise:
        return None
    where = (f"checkpoint {noise['checkpoint']}, training step {noise['measured_at_step']}"
             if noise.get("checkpoint") else f"fresh model, over its first {noise['steps']} steps")
    table = Table(title=f"Gradient noise scale ({where})", title_justify="left")
    for column in ("network", "noise scale (images)", "± std. error", "steps"):
        table.add_column(column, justify="left" if column == "network" else "right")
    groups = noise.get("groups") or [k for k in ("generator", "discriminator") if k in noise]
    for name in groups:
        est = noise.get(name)
        if not isinstance(est, dict):
            continue
        value, err = est.get("noise_scale"), est.get("noise_scale_stderr")
        table.add_row(name, "unmeasurable" if value is None else f"{value:,.1f}",
                      "-" if err is None else f"{err:,.1f}", f"{est.get('steps', 0):.0f}")
    decided = noise.get("decided_with")
    first = noise.get("decided_by") or (groups[0] if groups else "first")
    table.caption = (f"decided with the {first}'s, one standard error low: {decided:,.1f} images "
                     f"(micro-batches of {noise['micro_batch']} x {noise['micro_batches']}, raw gradients)"
                     if decided is not None else
                     noise.get("unavailable") or "not usable: batch kept at the reference")
    return table


def goodput_table(result: TuneResult) -> Table | None:
    """Per candidate batch: images/s, predicted efficiency and goodput (objective goodput)."""
    good = result.tuned.measurements.get("goodput")
    if not good:
        return None
    table = Table(title=f"Goodput (progress per second, relative to batch {good['reference_batch']})",
                  title_justify="left")
    for column in ("batch", "images/s", "predicted efficiency", "goodput", "lr factor"):
        table.add_column(column, justify="right")
    for row in good["rows"]:
        mark = " *" if row["batch"] == good["chosen_batch"] else ""
        table.add_row(f"{row['batch']}{mark}", _fmt_rate(row["images_per_s"]), f"{row['efficiency']:.2f}",
                      _fmt_rate(row["goodput"]), f"{row['lr_factor']:.2f}")
    table.caption = ("efficiency: what one image is worth at that batch against one at the reference "
                     "(from the noise scale); goodput = images/s x efficiency")
    return table


def knobs_table(result: TuneResult) -> Table | None:
    knobs = result.tuned.measurements.get("knobs")
    if not knobs:
        return None
    table = Table(title="Knobs (each measured, on only when it pays)", title_justify="left")
    for column in ("knob", "value", "reason"):
        table.add_column(column)
    for k in knobs:
        value = k["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{key} {v}" for key, v in value.items())
        table.add_row(k["knob"], "-" if value is None else str(value), k["reason"])
    return table


def workers_table(result: TuneResult) -> Table:
    mode = result.tuned.measurements["worker_mode"]
    table = Table(title=f"DataLoader workers ({mode})", title_justify="left")
    for column in ("workers", "prefetch", "images/s"):
        table.add_column(column, justify="right")
    choice = result.tuned.choice
    for w in result.workers:
        mark = " *" if (w.workers, w.prefetch_factor) == (choice.num_workers, choice.prefetch_factor) else ""
        table.add_row(f"{w.workers}{mark}", str(w.prefetch_factor or "-"), _fmt_rate(w.images_per_s))
    step = result.tuned.measurements.get("step_images_per_s")
    if mode != "end to end" and step:
        table.caption = f"train step consumes {step:,.1f} images/s; workers must supply 1.2x"
    return table


def ranks_table(result: TuneResult) -> Table | None:
    """Every rank's own search under torchrun, and which one limited the batch; None for
    a single-process run."""
    m = result.tuned.measurements
    ranks = m.get("ranks")
    if not ranks or len(ranks) < 2:
        return None
    agreed = result.tuned.choice.batch_size
    table = Table(
        title=f"Ranks ({m['world_size']} processes train at the smallest own batch)",
        title_justify="left",
    )
    for column in ("rank", "device", "memory", "target", "own batch", "peak memory", "images/s", "note"):
        table.add_column(column, justify="left" if column in ("device", "note") else "right")
    for r in ranks:
        device = r["device"] + (f" ({r['gpu_name']})" if r.get("gpu_name") else "")
        memory = format_bytes(r["gpu_total_bytes"]) if r.get("gpu_total_bytes") else "-"
        note = "limiting" if r["rank"] == m.get("limiting_rank") else ""
        table.add_row(
            str(r["rank"]), device, memory, format_bytes(r["target_bytes"]),
            str(r["chosen_batch"]), format_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "-",
            _fmt_rate(r.get("images_per_s")), note,
        )
    table.caption = (
        f"batch {agreed} per process x {m['world_size']} = {m['global_batch']} global "
        f"(rank {m.get('limiting_rank')} limiting); workers: rank 0's choice"
    )
    return table


def recommendation_table(result: TuneResult) -> Table:
    m = result.tuned.measurements
    verdict = m.get("verdict")
    # When the candidate was not faster, the file holds the seed default: the table
    # shows the candidate that was measured, and says plainly which one to use.
    fallback = verdict is not None and not verdict["keep_candidate"]
    c = TunedChoice(**m["candidate"]) if fallback else result.tuned.choice
    comp = m["comparison"]
    base = _baseline(result)
    seed_loader = base.loader()
    label = base.label
    title = (
        f"Candidate: NOT faster than the {label}; the tuned file holds the {label}"
        if fallback else "Recommendation"
    )
    table = Table(title=title, title_justify="left")
    for column in ("setting", label, "candidate" if fallback else "recommended", "measured effect"):
        table.add_column(column)
    prec = {p.precision: p for p in result.precision}
    seed_p, rec_p = prec.get(base.precision), prec.get(c.precision)
    prec_effect = (
        f"{rec_p.images_per_s / seed_p.images_per_s:.2f}x step speed at the reference batch"
        if seed_p and rec_p and seed_p.images_per_s and rec_p.images_per_s else "forced"
    )
    trials = {t.batch: t for t in result.search.trials if t.ok}
    chosen = trials.get(c.batch_size)
    batch_effect = (
        f"{format_bytes(chosen.peak_bytes)} peak ({100 * chosen.peak_bytes / result.target_bytes:.0f} % of target)"
        if chosen and chosen.peak_bytes else ""
    )
    workers = {(w.workers, w.prefetch_factor): w.images_per_s for w in result.workers}
    seed_w = workers.get((seed_loader.num_workers, seed_loader.prefetch_factor))
    rec_w = workers.get((c.num_workers, c.prefetch_factor))
    worker_batch = result.tuned.measurements.get("worker_batch")
    at = f"batch {worker_batch}" if worker_batch and worker_batch != c.batch_size else "the chosen batch"
    worker_effect = f"{_fmt_rate(rec_w)} vs {_fmt_rate(seed_w)} images/s at {at}" if seed_w and rec_w else ""
    batch_text = str(c.batch_size)
    if c.world_size > 1:
        limiting = result.tuned.measurements.get("limiting_rank")
        batch_text += f" per process x {c.world_size}"
        limited = f"rank {limiting} limited it" if limiting is not None else ""
        batch_effect = "; ".join(filter(None, [batch_effect, limited]))
    table.add_row("batch", str(seed_loader.batch_size), batch_text, batch_effect)
    table.add_row("precision", base.precision, c.precision, prec_effect)
    table.add_row("workers", str(seed_loader.num_workers), str(c.num_workers), worker_effect)
    table.add_row("pin_memory", str(seed_loader.pin_memory), str(c.pin_memory), "")
    table.add_row("persistent_workers", str(seed_loader.persistent_workers), str(c.persistent_workers), "")
    table.add_row("prefetch_factor", str(seed_loader.prefetch_factor), str(c.prefetch_factor or "-"), "")
    global_text = f" for global batch {c.batch_size * c.world_size}" if c.world_size > 1 else ""
    reference_lrs = result.tuned.workload.get("reference_lrs") or {}
    names = list(c.learning_rates)
    table.add_row("learning rate " + " / ".join(names),
                  " / ".join(f"{reference_lrs[n]:g}" if n in reference_lrs else "-" for n in names),
                  " / ".join(f"{c.learning_rates[n]:.3g}" for n in names),
                  f"{c.lr_rule} rule{global_text}, {c.warmup_steps} warm-up steps")
    knobs = {k["knob"]: k for k in result.tuned.measurements.get("knobs", [])}
    if knobs:
        table.add_row("channels_last", "False", str(c.channels_last),
                      knobs.get("channels_last", {}).get("reason", ""))
        if c.cpu_threads is not None:
            table.add_row("CPU threads", "torch default", str(c.cpu_threads), "measured against the workers")
        table.add_row("torch.compile", "False", str(c.compile), knobs.get("compile", {}).get("reason", ""))
    good = result.tuned.measurements.get("goodput")
    efficiency = None
    if good and c.noise_scale is not None:
        from autotune.goodput import efficiency as predicted_efficiency

        reference = good["reference_batch"]
        seed_eff = predicted_efficiency(seed_loader.batch_size, reference, c.noise_scale)
        rec_eff = predicted_efficiency(c.batch_size * c.world_size, reference, c.noise_scale)
        efficiency = rec_eff / seed_eff
        table.add_row("predicted efficiency", f"{seed_eff:.2f}", f"{rec_eff:.2f}",
                      f"per image, from the gradient noise scale {c.noise_scale:,.0f}")
    speedup = comp.get("speedup")
    if speedup and efficiency is not None:
        effect = (f"{speedup:.2f}x images/s x {efficiency:.2f} efficiency = "
                  f"[bold]{speedup * efficiency:.2f}x predicted training speed-up[/] ")
    elif speedup:
        effect = (f"{speedup:.2f}x images/s; not a training speed-up (a larger batch's images are "
                  "worth less: --objective goodput measures by how much) ")
    else:
        effect = ""
    table.add_row(
        "[bold]training images/s[/]",
        _fmt_rate(comp["seed_default_images_per_s"]),
        _fmt_rate(comp["recommended_images_per_s"]),
        effect
        + f"(end to end, median of {len(comp['rounds']['recommended'])} alternated rounds"
        + (f"; {comp['scope']}" if comp.get("scope") else "")
        + (f"; {comp['note']}" if comp.get("note") else "") + ")",
    )
    storage = result.tuned.measurements.get("storage") or {}
    if storage.get("limit"):
        table.caption = storage["limit"]
    if verdict is not None:
        use = f"{label} (in the tuned file)" if fallback else "recommended (in the tuned file)"
        table.add_row("verdict", "", Text(use), Text(verdict["message"] or f"faster than the {label}"))
    return table


def time_line(measurements: dict) -> str | None:
    """'tuning took 52 s: precision 9 s, noise scale 8 s, ...' (None for files written
    before phases were timed)."""
    total = measurements.get("tuning_seconds")
    phases = measurements.get("phase_seconds")
    if total is None or not phases:
        return None
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    return f"tuning took {total:.0f} s: {parts}"


def print_report(console, result: TuneResult) -> None:
    console.print(precision_table(result))
    noise = noise_table(result)
    if noise is not None:
        console.print(noise)
    console.print(trials_table(result))
    runoff = runoff_line(result.tuned.measurements)
    if runoff:
        say(runoff, to=console)
    good = goodput_table(result)
    if good is not None:
        console.print(good)
    ranks = ranks_table(result)
    if ranks is not None:
        console.print(ranks)
    console.print(workers_table(result))
    knobs = knobs_table(result)
    if knobs is not None:
        console.print(knobs)
    console.print(recommendation_table(result))
    goodput_verdict = result.tuned.measurements.get("goodput_verdict")
    if goodput_verdict:
        say(goodput_verdict, to=console)
    took = time_line(result.tuned.measurements)
    if took:
        say(took, to=console)
    for warning in result.warnings:
        warn(warning)


def plot_trials(result: TuneResult, path: str | Path) -> Path:
    """images/s and peak memory against batch size, with the target drawn in."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'arwgan-autotune[plot]'") from None
    path = Path(path)
    ok = sorted((t for t in result.search.trials if t.ok), key=lambda t: t.batch)
    failed = [t for t in result.search.trials if not t.ok]
    fig, ax_speed = plt.subplots(figsize=(7, 4))
    ax_mem = ax_speed.twinx()
    ax_speed.plot([t.batch for t in ok], [t.images_per_s for t in ok], "o-", color="tab:blue", label="images/s")
    ax_mem.plot([t.batch for t in ok], [t.peak_bytes / 2**30 for t in ok], "s--", color="tab:orange", label="peak memory")
    for t in failed:
        ax_speed.axvline(t.batch, color="tab:red", alpha=0.3)
    ax_mem.axhline(result.target_bytes / 2**30, color="tab:orange", alpha=0.5, linestyle=":", label="target")
    ax_speed.axvline(searched_batch(result), color="tab:green", alpha=0.6, label="chosen")
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_xlabel("batch size")
    ax_speed.set_ylabel("train step images/s")
    ax_mem.set_ylabel("peak memory (GiB)")
    handles = ax_speed.get_legend_handles_labels()[0] + ax_mem.get_legend_handles_labels()[0]
    ax_speed.legend(handles=handles, loc="upper left", fontsize=8)
    ax_speed.set_title(f"{result.tuned.workload.get('name', 'autotune')}: batch search (red: failed trials)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def result_from_tuned(tuned) -> TuneResult:
    """Rebuild what the tables need from a tuned file's recorded measurements."""
    from autotune.decisions import PrecisionMeasurement, WorkerMeasurement
    from autotune.search import SearchResult

    m = tuned.measurements
    try:
        return TuneResult(
            tuned=tuned,
            machine=m["machine"],
            search=SearchResult.from_dict(m["search"]),
            precision=[PrecisionMeasurement(**p) for p in m["precision"]],
            workers=[WorkerMeasurement(**w) for w in m["workers"]],
            target_bytes=m["target_bytes"],
            warnings=list(m.get("warnings", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"tuned file lacks the measurements to show ({type(exc).__name__}: {exc})") from None
