"""Summarise a gpu_check.sh run: ``summary.json`` and ``summary.txt`` in the output folder,
the text also on stdout. Exit 1 when any step or any check failed.

Every figure docs/results.md needs: the chosen batch and its peak against the target,
every trial's peak under the target, reserved memory before and after the search
(equal: empty_cache plus cuBLAS workspaces cleared before each reading), the precision
table, the worker table, the seed-vs-tuned ratio, the GPU tests (a skip is a failure)
and the 1-GPU torchrun smoke run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GiB = 2**30


def pytest_counts(junit: Path) -> dict:
    """passed / failed / errors / skipped from pytest's JUnit XML; None fields if absent."""
    if not junit.exists():
        return {"passed": None, "failed": None, "errors": None, "skipped": None,
                "skip_reasons": []}
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) for s in suites)
    errors = sum(int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    reasons = [f"{case.get('name')}: {skip.get('message', '')}"
               for case in root.iter("testcase") for skip in case.findall("skipped")]
    return {"passed": tests - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped, "skip_reasons": reasons}


def tuning_figures(tuned: dict) -> tuple[dict, list[str]]:
    """The tuned file's figures and the checks on them (list of failed checks)."""
    m, c = tuned["measurements"], tuned["choice"]
    target = m["target_bytes"]
    limit = target  # peaks are compared with the target itself; the margin is the tuner's
    trials = m["search"]["trials"]
    chosen = next((t for t in reversed(trials) if t["batch"] == c["batch_size"] and t["ok"]), None)
    over = [t["batch"] for t in m.get("trials", trials)
            if t.get("ok") and t.get("peak_bytes") is not None and t["peak_bytes"] > limit]
    before = m.get("memory_before_search_bytes") or {}
    after = m.get("memory_after_search_bytes") or {}
    figures = {
        "device": tuned["device"],
        "target_bytes": target,
        "context_bytes": m.get("context_bytes"),
        "choice": c,
        "chosen_peak_bytes": chosen["peak_bytes"] if chosen else None,
        "chosen_images_per_s": chosen["images_per_s"] if chosen else None,
        "trials_over_target": over,
        "search": m["search"],
        "precision": m["precision"],
        "workers": m["workers"],
        "worker_mode": m.get("worker_mode"),
        "comparison": m["comparison"],
        "memory_before": before,
        "memory_after": after,
        "tuning_seconds": m["tuning_seconds"],
        "warnings": m.get("warnings", []),
    }
    failed = []
    if chosen is None or chosen["peak_bytes"] is None or chosen["peak_bytes"] > target:
        failed.append("chosen batch's peak is not under the target")
    if over:
        failed.append(f"trials over the target: batches {over}")
    if before.get("torch_reserved_bytes") is None or (
        before.get("torch_reserved_bytes") != after.get("torch_reserved_bytes")
    ):
        failed.append("reserved memory after the search differs from before")
    speedup = m["comparison"].get("speedup")
    if not isinstance(speedup, (int, float)) or not speedup > 0:
        failed.append("no seed-vs-tuned ratio")
    return figures, failed


def gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def human_lines(summary: dict) -> list[str]:
    lines = [f"gpu_check: {'PASSED' if summary['passed'] else 'FAILED'} "
             f"in {summary['seconds']} s" + (f"; failed: {'; '.join(summary['failed'])}"
                                             if summary["failed"] else "")]
    p = summary["pytest_gpu"]
    lines.append(f"GPU tests: {p['passed']} passed, {p['failed']} failed, {p['errors']} errors, "
                 f"{p['skipped']} skipped (exit {summary['exit_codes'].get('pytest')})")
    t = summary.get("tuning")
    if t:
        c = t["choice"]
        lines.append(f"GPU {t['device'].get('gpu_name')}, torch {t['device'].get('torch_version')}, "
                     f"target {gib(t['target_bytes'])}, context {gib(t['context_bytes'])}")
        lines.append(f"chosen: batch {c['batch_size']}, {c['precision']}, {c['num_workers']} workers "
                     f"(prefetch {c['prefetch_factor']}), lr {c['learning_rates']['lr_g']:.3g}; peak "
                     f"{gib(t['chosen_peak_bytes'])} of {gib(t['target_bytes'])}, "
                     f"{t['chosen_images_per_s'] or 0:.0f} img/s")
        lines.append("precision: " + ", ".join(
            f"{p['precision']} {p['images_per_s'] or 0:.0f} img/s peak {gib(p['peak_bytes'])}"
            + ("" if p["finite"] else " (not finite)") for p in t["precision"]))
        lines.append("trials: " + ", ".join(
            f"{x['batch']}:{x['reason']}:{gib(x['peak_bytes'])}" for x in t["search"]["trials"]))
        lines.append("workers: " + ", ".join(
            f"{w['workers']}w/pf{w['prefetch_factor']} {w['images_per_s'] or 0:.0f} img/s"
            + (f" ({w['error']})" if w.get("error") else "") for w in t["workers"]))
        comp = t["comparison"]
        seed, rec = comp.get("seed_default_images_per_s"), comp.get("recommended_images_per_s")
        lines.append(f"seed default {seed or 0:.0f} img/s -> tuned {rec or 0:.0f} img/s: "
                     f"{comp.get('speedup') or float('nan'):.2f}x"
                     + (f" ({comp['note']})" if comp.get("note") else ""))
        before, after = t["memory_before"], t["memory_after"]
        lines.append(f"reserved before/after search: {before.get('torch_reserved_bytes')} / "
                     f"{after.get('torch_reserved_bytes')} bytes; tuning {t['tuning_seconds']:.0f} s")
    else:
        lines.append("tuning: no tuned.json (see tune.txt)")
    verdict = (summary.get("doctor") or {}).get("verdict")
    if verdict:
        lines.append(f"doctor on the tuned configuration: {verdict['label']}: {verdict['evidence']}")
    smoke = summary["torchrun"]
    lines.append(f"torchrun 1-GPU smoke: exit {summary['exit_codes'].get('torchrun')}, "
                 f"{smoke.get('images_per_s', '-')} img/s, steps {smoke.get('step', '-')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--junit", type=Path, default=Path("/nonexistent"))
    parser.add_argument("--torchrun-log", type=Path, default=Path("/nonexistent"))
    parser.add_argument("--rc", action="append", default=[], help="step=exit code")
    parser.add_argument("--missing", default="", help="Python modules that failed to import")
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args(argv)
    out: Path = args.out
    codes = {k: int(v) for k, v in (item.split("=", 1) for item in args.rc)}
    failed = [f"step {name} exited {code}" for name, code in codes.items() if code != 0]
    if args.missing:
        failed.append(f"missing modules: {args.missing}")
    counts = pytest_counts(args.junit)
    if counts["passed"] is None:
        failed.append("no pytest result")
    else:
        if counts["skipped"]:
            failed.append(f"{counts['skipped']} GPU test(s) skipped")
        if counts["failed"] or counts["errors"]:
            failed.append(f"{counts['failed']} GPU test(s) failed, {counts['errors']} errors")
        if counts["passed"] == 0:
            failed.append("no GPU test passed")
    summary: dict = {"pytest_gpu": counts, "exit_codes": codes, "seconds": args.seconds}
    tuned_path = out / "tuned.json"
    if tuned_path.exists():
        try:
            summary["tuning"], tuning_failed = tuning_figures(json.loads(tuned_path.read_text()))
            failed += tuning_failed
        except (KeyError, TypeError, ValueError) as exc:
            failed.append(f"tuned.json unreadable: {type(exc).__name__}: {exc}")
    else:
        failed.append("no tuned.json")
    smoke: dict = {}
    if args.torchrun_log.exists():
        with args.torchrun_log.open() as fh:
            rows = list(csv.DictReader(fh))
        smoke = rows[-1] if rows else {}
    if not smoke:
        failed.append("torchrun smoke run wrote no log row")
    summary["torchrun"] = smoke
    doctor_path = out / "doctor.json"
    if doctor_path.exists():
        try:
            report = json.loads(doctor_path.read_text())
            summary["doctor"] = {key: value for key, value in report.items() if key != "timeline"}
        except ValueError as exc:
            failed.append(f"doctor.json unreadable: {exc}")
    elif "doctor" in codes:
        failed.append("doctor wrote no report")
    summary["failed"] = failed
    summary["passed"] = not failed
    text = "\n".join(human_lines(summary)) + "\n"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
