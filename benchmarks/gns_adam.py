"""Which noise scale predicts Adam's large-batch behaviour: raw gradients, or gradients
divided by Adam's preconditioner (AdaptDL's choice)?

    python benchmarks/gns_adam.py              # about a minute on one core

On a small, deliberately ill-conditioned regression (an MLP student fits a noisy MLP
teacher whose inputs have scales from 0.1 to 10), Adam is trained to a fixed validation
loss at several batch sizes, each with its best learning rate from a grid (McCandlish et
al. tune the rate per batch in the same way). The steps needed, S(B), are compared with
the empirical model S(B) = S_min (1 + B_noise / B), i.e. the predicted ratio
S(B) / S(B0) = (1 + B_noise/B) / (1 + B_noise/B0), where B_noise is measured along the
reference run (batch B0, its best rate) up to the target, raw and preconditioned. The
one with the smaller log error predicts better; efficiency E(B) uses the same B_noise.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from autotune.gns import MicroBatchGradients, NoiseScale, adam_preconditioner

D_IN, HIDDEN = 16, 32


def make_problem(seed: int, noise: float):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, D_IN)
    teacher = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))

    def sample(n: int, g: torch.Generator):
        x = torch.randn(n, D_IN, generator=g) * scales
        with torch.no_grad():
            y = teacher(x / scales) + noise * torch.randn(n, 1, generator=g)
        return x, y

    return sample


def student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def train_to_target(sample, val, batch, lr, target, max_steps, seed, eval_every, measure=None):
    """Steps until the validation loss first falls to ``target`` (None if never).
    ``measure``: (micro-batches k, raw NoiseScale, preconditioned NoiseScale) fed at every
    evaluation with a fresh batch of k x batch examples."""
    model = student(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1000)
    x_val, y_val = val
    for step in range(max_steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                loss = float(torch.nn.functional.mse_loss(model(x_val), y_val))
            if not math.isfinite(loss):
                return None
            if loss <= target:
                return step
            if measure is not None:
                k, raw, pre = measure
                x, y = sample(k * batch, gen)
                for acc, precondition in ((raw, None), (pre, adam_preconditioner(opt))):
                    reader = MicroBatchGradients(model.parameters(), precondition)
                    for j in range(k):
                        model.zero_grad(set_to_none=True)
                        part = slice(j * batch, (j + 1) * batch)
                        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
                        reader.add()
                    acc.update(*reader.finish(), micro_batch=batch)
        if step == max_steps:
            return None
        x, y = sample(batch, gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--reference", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--target", type=float, default=0.09, help="validation MSE to reach")
    parser.add_argument("--noise", type=float, default=0.2, help="label noise std (floor = noise^2)")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        sample = make_problem(seed, args.noise)
        val = sample(4096, torch.Generator().manual_seed(seed + 99))
        steps = {}
        best_lr = {}
        for batch in args.batches:
            found = {lr: train_to_target(sample, val, batch, lr, args.target, args.max_steps, seed,
                                         args.eval_every) for lr in args.lrs}
            reached = {lr: s for lr, s in found.items() if s is not None}
            steps[batch] = min(reached.values()) if reached else None
            best_lr[batch] = min(reached, key=reached.get) if reached else None
            print(f"seed {seed} batch {batch:4d}: steps to target {found}", flush=True)
        ref = args.reference
        if steps.get(ref) is None:
            print(f"seed {seed}: the reference batch never reached the target; skipped")
            continue
        raw, pre = NoiseScale(), NoiseScale()
        train_to_target(sample, val, ref, best_lr[ref], args.target, args.max_steps, seed,
                        args.eval_every, measure=(4, raw, pre))
        noise = {"raw": raw.estimate(), "adam_preconditioned": pre.estimate()}
        for name, est in noise.items():
            errors = []
            for batch in args.batches:
                if batch == ref or steps[batch] is None:
                    continue
                observed = steps[batch] / steps[ref]
                bn = est.noise_scale
                predicted = (1 + bn / batch) / (1 + bn / ref)
                errors.append(abs(math.log(predicted / observed)))
                rows.append({"seed": seed, "space": name, "batch": batch, "noise_scale": bn,
                             "noise_scale_stderr": est.noise_scale_stderr,
                             "observed_ratio": observed, "predicted_ratio": predicted})
                print(f"seed {seed} {name:19s} B_noise {bn:8.1f} +- {est.noise_scale_stderr:6.1f}  "
                      f"batch {batch:4d}: S(B)/S({ref}) observed {observed:.3f} predicted {predicted:.3f}")
            mean_err = sum(errors) / len(errors) if errors else math.nan
            print(f"seed {seed} {name:19s} mean |log(predicted/observed)| = {mean_err:.3f}", flush=True)
    for name in ("raw", "adam_preconditioned"):
        errs = [abs(math.log(r["predicted_ratio"] / r["observed_ratio"])) for r in rows if r["space"] == name]
        if errs:
            print(f"ALL {name:19s} mean |log(predicted/observed)| = {sum(errs) / len(errs):.3f} "
                  f"over {len(errs)} (seed, batch) pairs")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"config": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
