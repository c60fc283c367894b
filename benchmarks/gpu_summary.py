"""Summarise a gpu_check.sh run: JSON (summary.json) and a short markdown table (stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    summary: dict = {"pytest_gpu": (out / "pytest_gpu.txt").read_text().strip().splitlines()[-2:]
                     if (out / "pytest_gpu.txt").exists() else None}
    tuned_path = out / "tuned.json"
    if not tuned_path.exists():
        print("no tuned.json: the tuning step failed; see tune.txt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return
    tuned = json.loads(tuned_path.read_text())
    m, c = tuned["measurements"], tuned["choice"]
    before, after = m.get("memory_before_search_bytes") or {}, m.get("memory_after_search_bytes") or {}
    oom_trials = [t for t in m["search"]["trials"] if t["reason"] == "oom"]
    summary.update({
        "device": tuned["device"], "choice": c,
        "precision": m["precision"], "comparison": m["comparison"],
        "search": m["search"], "target_bytes": m["target_bytes"],
        "memory_before": before, "memory_after": after, "oom_trials": len(oom_trials),
        "memory_back_to_pre_search": (after.get("torch_reserved_bytes", 0)
                                      <= before.get("torch_reserved_bytes", 0) + 2**21),
        "tuning_seconds": m["tuning_seconds"],
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    gib = 2**30
    print(f"GPU: {tuned['device'].get('gpu_name')}  torch {tuned['device'].get('torch_version')}")
    print("\n| precision | images/s (batch 16 step) | peak memory |\n|---|---|---|")
    for p in m["precision"]:
        ips = f"{p['images_per_s']:.0f}" if p["images_per_s"] else "-"
        peak = f"{p['peak_bytes'] / gib:.2f} GiB" if p["peak_bytes"] else "-"
        print(f"| {p['precision']} | {ips} | {peak} |")
    print("\n| batch | peak memory | images/s | outcome |\n|---|---|---|---|")
    for t in m["search"]["trials"]:
        peak = f"{t['peak_bytes'] / gib:.2f} GiB" if t["peak_bytes"] else "-"
        ips = f"{t['images_per_s']:.0f}" if t["images_per_s"] else "-"
        print(f"| {t['batch']} | {peak} | {ips} | {t['reason']} |")
    comp = m["comparison"]
    print(f"\nchoice: batch {c['batch_size']}, {c['precision']}, {c['num_workers']} workers, "
          f"lr {c['lr_g']:.3g}")
    print(f"seed default {comp['seed_default_images_per_s']:.0f} img/s -> recommended "
          f"{comp['recommended_images_per_s']:.0f} img/s: {comp['speedup']:.2f}x end to end")
    print(f"memory reserved before/after search: {before.get('torch_reserved_bytes')} / "
          f"{after.get('torch_reserved_bytes')} bytes ({len(oom_trials)} OOM trials); "
          f"back to pre-search level: {summary['memory_back_to_pre_search']}")
    print(f"tuning took {m['tuning_seconds']:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check"))
