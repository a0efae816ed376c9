r"""Samplers against an exact denoiser: sliced Wasserstein distance to the target at a given NFE.

    python benchmarks/bench_samplers.py              # the full sweep; writes the results file
    python benchmarks/bench_samplers.py --quick      # NFE 5 and 10, 2 seeds, no file: a smoke run

The task. The target is a 2-D mixture of five Gaussians with unequal weights (0.32 to 0.10)
and unequal, anisotropic widths (standard deviations 0.10 to 0.50), whose denoiser
$\mathbb E[x_0\mid x_t]$ is exact (:class:`stepdiff.denoisers.GaussianMixture`). Every sampler
starts from an exact draw of $p_{t_0}$ at the grid's first time (so the only error is the
sampler's) and runs on two variance-preserving schedules of 1000 levels, DDPM's linear
$\beta$ and the cosine one (``DiscreteVPSchedule``, the diffusers vocabulary). Its 20,000
outputs are compared with 20,000 fresh draws of the target by the sliced 2-Wasserstein
distance (:func:`stepdiff.metrics.sliced_wasserstein`, 64 directions, the same for every run).
The **sampling floor** is the same distance between two independent sets of 20,000 true draws:
what a perfect sampler scores. Each seed draws the sampler's start, the fresh target sample
and the floor's second sample, and every solver and grid sees the same three (paired
comparisons); numbers are means over the seeds, with the standard error: 8 seeds for budgets of
5, 10 and 20 calls, the first 3 for 50, 100 and the 1000-step references (where every good
solver is on the floor), each ratio taken to the floor of the same seeds.

Solvers: DDPM (ancestral), DDIM, Euler, Heun, midpoint, DPM-Solver++(2M) as published and
with ``lower_order_final``, DPM-Solver++(3M), UniPC (predictor orders 2 and 3, bh2, with its
corrector) and DEIS (third order). Grids (:func:`stepdiff.schedules.time_grid`): ``uniform``,
``linspace``, ``trailing``, ``quadratic``, ``karras`` ($\rho = 7$) and ``logsnr``, both from the
top level down to $\sigma_{\min}$ = the schedule's first training level ($t = 1/T$, as
diffusers ends its Karras and exponential sigmas), and ``cosine``. Budgets of 5, 10, 20, 50 and
100 model calls are counted as the calls that run (:func:`stepdiff.samplers.model_calls`):
Heun takes $n$ steps with $2n - 1$ calls (its last step is Euler), midpoint $2n$, so a budget
they cannot meet exactly gets the largest count below it, and each record says what ran. A
1000-step reference runs DDPM and DDIM on every level and DPM-Solver++(3M) on the log-SNR grid.

Writes ``stepdiff/results/samplers_exact_denoiser.json`` (atomically; package data, installed
with stepdiff, so chapter II.6 reads it from any install): the command, date, versions, the
task, seeds and sample counts, the floor, one record per (schedule, solver, grid, budget), and
the best solver and grid per budget with its ratio to the floor; prints a compact table of the
best per budget and the table of every solver at its best grid.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdiff.checkpoints import write_json  # noqa: E402
from stepdiff.denoisers import GaussianMixture, exact_denoiser  # noqa: E402
from stepdiff.metrics import sliced_wasserstein  # noqa: E402
from stepdiff.samplers import SAMPLERS, model_calls, steps_for_nfe  # noqa: E402
from stepdiff.schedules import DiscreteVPSchedule, Schedule, time_grid  # noqa: E402

RESULTS = ROOT / "stepdiff" / "results" / "samplers_exact_denoiser.json"  # package data: chapter II.6 reads it
f64 = torch.float64
N_SAMPLES = 20_000
N_PROJECTIONS = 64
FEW_SEEDS = 3  # seeds for budgets of 50 calls and more, where every good solver sits on the floor
NFES = (5, 10, 20, 50, 100)
SCHEDULES = {
    "linear": lambda: DiscreteVPSchedule(1000, "linear"),
    "cosine": lambda: DiscreteVPSchedule(1000, "squaredcos_cap_v2"),
}


def _rotated(stds: tuple[float, float], degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=f64)
    return rot @ torch.diag(torch.tensor(stds, dtype=f64) ** 2) @ rot.T


def target() -> GaussianMixture:
    """Five unequal modes: weights 0.32 to 0.10, standard deviations 0.10 to 0.50, some tilted."""
    means = torch.tensor([[-2.0, -1.0], [1.5, 1.2], [2.2, -1.6], [-0.8, 2.0], [0.2, -0.3]], dtype=f64)
    covs = torch.stack(
        [
            _rotated((0.5, 0.2), 30),
            _rotated((0.3, 0.3), 0),
            _rotated((0.1, 0.4), -20),
            _rotated((0.15, 0.15), 0),
            _rotated((0.25, 0.12), 60),
        ]
    )
    return GaussianMixture(means, covs, torch.tensor([0.32, 0.24, 0.20, 0.14, 0.10], dtype=f64))


# A solver of the sweep: the package's sampler and its keyword arguments.
SOLVERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("ddpm", {}),
    "ddim": ("ddim", {}),
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "midpoint": ("midpoint", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_lof": ("dpmpp_2m", {"lower_order_final": True}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "unipc_2": ("unipc", {"order": 2}),
    "unipc_3": ("unipc", {"order": 3}),
    "deis_3": ("deis", {"order": 3}),
}
REFERENCE = [("ddpm", "uniform"), ("ddim", "uniform"), ("dpmpp_3m", "logsnr")]


def first_level(schedule: Schedule) -> float:
    """The VE noise level of the schedule's first training time, $t = 1/T$: where grids that end in
    a noise level stop (as diffusers' Karras and exponential sigmas do)."""
    return float(schedule.sigma_ve(schedule.t_of_index(0)))


GRIDS = {
    "uniform": lambda n, sch: time_grid(n, "uniform"),
    "linspace": lambda n, sch: time_grid(n, "linspace", sch),
    "trailing": lambda n, sch: time_grid(n, "trailing", sch),
    "quadratic": lambda n, sch: time_grid(n, "quadratic"),
    "karras": lambda n, sch: time_grid(n, "karras", sch, sigma_min=first_level(sch)),
    "logsnr": lambda n, sch: time_grid(n, "logsnr", sch, sigma_min=first_level(sch)),
    "cosine": lambda n, sch: time_grid(n, "cosine", sch),
}


def grid(spacing: str, n_steps: int, schedule: Schedule) -> torch.Tensor:
    return GRIDS[spacing](n_steps, schedule)


class Task:
    """The target, its fresh samples per seed and the floor, shared by every run."""

    def __init__(self, seeds: list[int], n: int = N_SAMPLES):
        self.mixture = target()
        self.seeds, self.n = seeds, n
        # The directions of stepdiff.metrics.sliced_wasserstein with generator 0, and per seed the
        # sorted projections of the fresh target sample every run is compared with (sorted once).
        theta = torch.randn(2, N_PROJECTIONS, generator=torch.Generator().manual_seed(0), dtype=f64)
        self.theta = theta / theta.norm(dim=0, keepdim=True)
        self.truth = {s: self.mixture.sample(n, 10_000 + s) for s in seeds}
        self.sorted_truth = {s: torch.sort(self.theta.T @ x.T, dim=1).values for s, x in self.truth.items()}
        self.floor_per_seed = [self.distance(self.mixture.sample(n, 20_000 + s), s) for s in seeds]
        # The shortcut must be the package's metric: check it once on the floor's first sample.
        check = float(sliced_wasserstein(self.mixture.sample(n, 20_000 + seeds[0]), self.truth[seeds[0]],
                                         N_PROJECTIONS, generator=0))
        if abs(check - self.floor_per_seed[0]) > 1e-9 * check:
            raise RuntimeError(f"cached sliced Wasserstein {self.floor_per_seed[0]} != the package's {check}")

    def distance(self, samples: torch.Tensor, seed: int) -> float:
        """sliced_wasserstein(samples, truth[seed], N_PROJECTIONS, generator=0), reusing the sorted truth."""
        if samples.shape != (self.n, 2) or not bool(torch.isfinite(samples).all()):
            raise ValueError(f"expected {self.n} finite 2-D samples; got {tuple(samples.shape)}")
        projected = torch.sort(self.theta.T @ samples.to(f64).T, dim=1).values
        return float((projected - self.sorted_truth[seed]).pow(2).mean(1).mean().sqrt())

    def run(self, solver: str, spacing: str, n_steps: int, schedule: Schedule, seeds: list[int]) -> list[float]:
        name, kwargs = SOLVERS[solver]
        ts = grid(spacing, n_steps, schedule)
        model = exact_denoiser(self.mixture, schedule)
        out = []
        for s in seeds:
            x_start = self.mixture.marginal(float(ts[0]), schedule).sample(self.n, s)
            extra = {"generator": 30_000 + s} if name == "ddpm" else {}
            samples = SAMPLERS[name](model, x_start, schedule, ts, **kwargs, **extra)
            out.append(self.distance(samples, s))
        return out


def _mean_sem(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def sweep(task: Task, schedules: list[str], solvers: list[str], grids: list[str], nfes: list[int],
          reference: bool, log=print, save=None) -> list[dict]:
    """Run every (schedule, solver, grid, budget); ``save(records)`` is called every 20 records."""
    records = []
    plan = [(sch, solver, g, b) for b in nfes for sch in schedules for solver in solvers for g in grids]
    if reference:
        plan += [(sch, solver, g, 1000) for sch in schedules for solver, g in REFERENCE if solver in solvers]
    for k, (sch, solver, g, budget) in enumerate(plan):
        schedule = SCHEDULES[sch]()
        name = SOLVERS[solver][0]
        if budget < 2 and name == "midpoint":
            continue
        n_steps = steps_for_nfe(name, budget)
        start = time.process_time()
        seeds = task.seeds if budget < 50 else task.seeds[:FEW_SEEDS]
        per_seed = task.run(solver, g, n_steps, schedule, seeds)
        mean, sem = _mean_sem(per_seed)
        # The ratio to the floor of the same seeds (the runs are paired with the floor's seeds).
        floor = _mean_sem(task.floor_per_seed[: len(seeds)])[0]
        records.append({
            "schedule": sch, "solver": solver, "grid": g, "budget": budget, "nfe": model_calls(name, n_steps),
            "steps": n_steps, "seeds": len(seeds), "sw": mean, "sw_sem": sem, "ratio": mean / floor,
            "sw_per_seed": per_seed,
        })
        log(f"[{k + 1}/{len(plan)}] {sch:6s} {solver:13s} {g:9s} nfe {model_calls(name, n_steps):4d}  "
            f"sw {mean:.4f} +- {sem:.4f}  ratio {mean / floor:5.2f}  ({time.process_time() - start:.1f} s CPU)")
        if save is not None and len(records) % 20 == 0:
            save(records)
    return records


def best_per_budget(records: list[dict]) -> list[dict]:
    """For each schedule and budget (1000 excluded), the solver and grid with the lowest mean distance."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r["budget"] == 1000:
            continue
        key = (r["schedule"], r["budget"])
        if key not in best or r["sw"] < best[key]["sw"]:
            best[key] = r
    return [{k: best[key][k] for k in ("schedule", "budget", "solver", "grid", "nfe", "sw", "sw_sem", "ratio")}
            for key in sorted(best)]


def print_tables(records: list[dict], floor: float, floor_sem: float) -> None:
    print(f"\nsampling floor (two true samples of {N_SAMPLES}): SW {floor:.4f} +- {floor_sem:.4f}")
    print("\nbest solver and grid per NFE budget (ratio = SW / floor)")
    print(f"{'schedule':8s} {'budget':>6s}  {'solver':13s} {'grid':9s} {'nfe':>4s}  {'SW':>7s}  ratio")
    for b in best_per_budget(records):
        print(f"{b['schedule']:8s} {b['budget']:6d}  {b['solver']:13s} {b['grid']:9s} {b['nfe']:4d}  "
              f"{b['sw']:.4f}  {b['ratio']:5.2f}")
    for sch in sorted({r["schedule"] for r in records}):
        budgets = sorted({r["budget"] for r in records if r["schedule"] == sch and r["budget"] != 1000})
        print(f"\n{sch}: ratio to the floor of each solver at its best grid (grid in brackets)")
        print(f"{'solver':13s}" + "".join(f"{b:>16d}" for b in budgets))
        for solver in SOLVERS:
            cells = []
            for b in budgets:
                rs = [r for r in records if (r["schedule"], r["solver"], r["budget"]) == (sch, solver, b)]
                if not rs:
                    cells.append(f"{'-':>16s}")
                    continue
                r = min(rs, key=lambda r: r["sw"])
                cells.append(f"{r['ratio']:7.2f} [{r['grid'][:6]:6s}]")
            if any(c.strip() != "-" for c in cells):
                print(f"{solver:13s}" + "".join(cells))
        refs = [r for r in records if r["schedule"] == sch and r["budget"] == 1000]
        for r in refs:
            print(f"reference: {r['solver']} on {r['grid']}, {r['nfe']} calls: ratio {r['ratio']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="NFE 5 and 10, 2 seeds, no results file")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--seeds", type=int, default=8, help="number of seeds (default 8)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    parser.add_argument("--no-reference", action="store_true", help="skip the 1000-step runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.nfe, args.no_reference = 2, [5, 10], True
    torch.set_num_threads(1)  # the exact denoiser is small; one thread is the fastest per CPU second
    started = time.process_time()
    task = Task(list(range(args.seeds)))
    floor, floor_sem = _mean_sem(task.floor_per_seed)
    command = "python benchmarks/bench_samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(records: list[dict]) -> None:
        if args.quick or args.no_write:
            return
        write_json(args.out, results_file(args, task, command, records, time.process_time() - started))

    records = sweep(task, args.schedules, args.solvers, args.grids, args.nfe, not args.no_reference, save=save)
    print_tables(records, floor, floor_sem)
    save(records)
    if not (args.quick or args.no_write):
        print(f"\nwrote {args.out}")


def results_file(args, task: Task, command: str, records: list[dict], cpu_seconds: float) -> dict:
    floor, floor_sem = _mean_sem(task.floor_per_seed)
    return {
        "command": command.strip(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "cpu_seconds": round(cpu_seconds, 1),
        "task": {
            "target": {
                "means": task.mixture.means.tolist(),
                "covariances": task.mixture.covariances().tolist(),
                "weights": task.mixture.weights.tolist(),
            },
            "schedules": {k: repr(v()) for k, v in SCHEDULES.items() if k in args.schedules},
            "grids": {
                "karras": "sigma_min = the schedule's first level (t = 1/T), rho = 7",
                "logsnr": "sigma_min = the schedule's first level (t = 1/T)",
                "first_levels": {k: first_level(v()) for k, v in SCHEDULES.items() if k in args.schedules},
            },
            "start": "an exact draw of p_t at the grid's first time",
            "n_samples": task.n,
            "metric": f"sliced 2-Wasserstein, {N_PROJECTIONS} directions (generator 0)",
            "seeds": task.seeds,
            "seed_use": "start: seed, fresh target: 10000 + seed, floor's second sample: 20000 + seed, "
                        "DDPM noise: 30000 + seed",
        },
        "floor": {
            "sw": floor,
            "sw_sem": floor_sem,
            "sw_per_seed": task.floor_per_seed,
            f"sw_first_{FEW_SEEDS}_seeds": _mean_sem(task.floor_per_seed[:FEW_SEEDS])[0],
        },
        "best": best_per_budget(records),
        "records": records,
    }


if __name__ == "__main__":
    main()
