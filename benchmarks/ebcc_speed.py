"""EBCC with 40 restarts on a dense synthetic panel (default 1,000,000 tasks x 12 annotators x 5 classes).

The panel imitates a crowd of LLMs: each annotator has an accuracy in [0.6, 0.9] on easy tasks
and 0.3 less on hard ones (30 % of tasks), and wrong answers go to a per-class "confusable"
class more often than not, so annotators err together (what EBCC's subtypes model).

Prints one table: tasks, distinct answer rows, restarts, wall seconds and CPU seconds (first
call, which compiles, and a second call on the same shapes), accuracy of EBCC and of majority
vote. On a shared machine the CPU seconds (all threads of this process) are the figure that
does not depend on what else runs.

Usage:
    nice python benchmarks/ebcc_speed.py [--tasks 1000000] [--workers 12] [--classes 5] [--restarts 40]
        [--screen-iter N|none] [--keep N] [--screen-tasks N|none] [--accelerate auto|on|off]
        [--native auto|on|off]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def panel(n_tasks: int, n_workers: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n_tasks)
    hard = rng.random(n_tasks) < 0.3
    acc = rng.uniform(0.6, 0.9, n_workers)
    acc_t = np.where(hard[:, None], acc[None] - 0.3, acc[None])
    confusable = (np.arange(n_classes) + 1) % n_classes
    wrong_random = (truth[:, None] + rng.integers(1, n_classes, (n_tasks, n_workers))) % n_classes
    wrong = np.where(rng.random((n_tasks, n_workers)) < 0.6, confusable[truth][:, None], wrong_random)
    labels = np.where(rng.random((n_tasks, n_workers)) < acc_t, truth[:, None], wrong)
    return labels.astype(np.int8), truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=40)
    ap.add_argument("--restart-batch", type=int, default=None)
    ap.add_argument("--screen-iter", default="default",
                    help="sweeps before the restarts are screened ('none': every restart runs to the end)")
    ap.add_argument("--keep", type=int, default=None, help="restarts that run on after screening")
    ap.add_argument("--screen-tasks", default="default",
                    help="tasks sampled to screen on ('none': screen on all of them)")
    ap.add_argument("--repeat", type=int, default=2, help="calls to time (the first compiles)")
    ap.add_argument("--accelerate", choices=["auto", "on", "off"], default="auto",
                    help="over-relaxed sweeps (auto: past 1,000,000 answers)")
    ap.add_argument("--native", choices=["auto", "on", "off"], default="auto",
                    help="the sweeps on the native kernel (auto: where it applies)")
    args = ap.parse_args()

    from crowdllm.aggregation import EBCC, MajorityVote
    from crowdllm.aggregation.ebcc import merge_patterns
    from crowdllm.eval import speed
    from crowdllm.labels import LabelTensor

    labels, truth = panel(args.tasks, args.workers, args.classes)
    tensor = LabelTensor.from_dense(labels)
    t0 = time.perf_counter()
    patterns, _, _, _ = merge_patterns(tensor, None)
    t_merge = time.perf_counter() - t0
    mv = MajorityVote(ties="random").fit(tensor)
    screen = {}
    if args.screen_iter != "default":
        screen["screen_iter"] = None if args.screen_iter == "none" else int(args.screen_iter)
    if args.keep is not None:
        screen["keep"] = args.keep
    if args.accelerate != "auto":
        screen["accelerate"] = args.accelerate == "on"
    if args.screen_tasks != "default":
        screen["screen_tasks"] = None if args.screen_tasks == "none" else int(args.screen_tasks)
    rows = []
    for i in range(args.repeat):
        model = EBCC(restarts=args.restarts, restart_batch=args.restart_batch, seed=i,
                     native=args.native, **screen)
        t0, c0 = time.perf_counter(), time.process_time()
        model.fit(tensor)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append((i + 1, dt, cpu, float((model.label_codes_ == truth).mean()), model.n_iter_,
                     int(np.sum(model.sweeps_)),
                     float(np.nanmax(model.elbos_)), float(np.nanmin(model.elbos_))))
    print(f"machine: {speed.machine()}; panel {args.tasks} x {args.workers} x {args.classes}, "
          f"{patterns.n_tasks} distinct answer rows (merged in {t_merge:.2f} s)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (CPU seconds = time on all cores of this process)")
    probe = EBCC(restarts=args.restarts, **screen)
    print(f"screening: screen_iter={probe.screen_iter}, keep={probe.keep}, screen_tasks={probe.screen_tasks}, "
          f"accelerate={probe.accelerate}, native={args.native} (used: {model.native_used_})")
    print(f"{'call':>4} {'restarts':>8} {'seconds':>8} {'cpu_s':>8} {'acc_ebcc':>8} {'acc_mv':>7} {'iters(best)':>11} "
          f"{'sweeps(all)':>11} {'best_elbo':>10} {'worst_elbo':>10}")
    acc_mv = float((mv.label_codes_ == truth).mean())
    for call, dt, cpu, acc, it, sw, hi, lo in rows:
        print(f"{call:>4} {args.restarts:>8} {dt:8.1f} {cpu:8.1f} {acc:8.4f} {acc_mv:7.4f} {it:>11} {sw:>11} "
              f"{hi:10.5f} {lo:10.5f}")


if __name__ == "__main__":
    main()
