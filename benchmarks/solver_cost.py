"""Solver work per inversion step, apart from the model: what each method's arithmetic costs.

    python benchmarks/solver_cost.py                      # 1x4x128x128 (SDXL at 1024 px), CPU
    python benchmarks/solver_cost.py --shape 1 16 128 128 --steps 20

The denoiser is the exact one of Gaussian data ``N(0, v I)`` (``x v / (v + s^2)`` in EPS
coordinates, its flow form in flow ones): one multiply, so the inversion's time is
nearly all solver work, and its iterative methods converge as on a smooth real model.
The denoiser's own time is measured alone and subtracted. Each method runs ``--repeat``
times; the fastest run counts (CPU time of the process, so neighbours on a shared machine
do not move it). Printed per method: model calls per step, solver ms per step, its ratio
to DDIM's, and its share of a step where one model call costs ``--model-ms`` (default: the
bundled TinyUNet on a 3-channel input of the latent's height and width, measured here).
The last row is a floor, not a method: what any step that checks its result must compute
(``checked_steps``).
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import bootstrap  # noqa: E402  (loads the pack as inversion_suite)


class Gaussian:
    """Exact denoiser of N(0, v I) data, timed."""

    def __init__(self, space, var=0.25):
        self.space, self.var, self.seconds, self.calls = space, var, 0.0, 0

    def __call__(self, x, sigma):
        t = time.process_time()
        s = float(sigma[0])
        if self.space == "eps":
            out = x * (self.var / (self.var + s * s))
        else:  # x = (1 - s) x0 + s eps: E[x0 | x] = x (1 - s) v / ((1 - s)^2 v + s^2)
            out = x * ((1 - s) * self.var / ((1 - s) ** 2 * self.var + s * s))
        self.seconds += time.process_time() - t
        self.calls += 1
        return out


def model_ms(shape, threads):
    """Milliseconds of one guided call of the bundled TinyUNet at the latent's height and width."""
    import torch
    from inversion_suite.benchmarks.tinyunet import load
    net = load("eps")
    x = torch.randn(shape[0], 3, *shape[2:])
    s, labels = torch.full((shape[0],), 0.5), torch.zeros(shape[0], dtype=torch.long)
    with torch.no_grad():
        net(x, s, labels, 1.0)
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            net(x, s, labels, 1.0)
            best = min(best, (time.process_time() - t) / threads)
    return 1e3 * best


def checked_steps(model, x, sigmas, space):
    """The least a step that checks its own result computes, in the implicit loop's own pieces:
    the extrapolated start, then two evaluations of ``F`` with their residuals, the second at
    ``F`` of the first (as if the update between them were free). It solves nothing; its time
    is the floor under any verified method's solver work."""
    from inversion_suite.solvers.core import Denoiser
    from inversion_suite.solvers.implicit import Map, guess_point
    den, s, states = Denoiser(model, None, "floor"), [float(v) for v in sigmas], []
    for sa, sb in zip(s, s[1:]):
        F, xi, prev = Map(den, x, sa, sb), guess_point(x, sa, sb, space, states[-2:]).flatten(1), None
        for _ in range(2):
            g = F.evaluate(xi, prev)[0]
            prev, xi = (xi, g), g
        states.append((sa, x))
        x = xi.view(x.shape)
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description="Solver work per inversion step, apart from the model.")
    p.add_argument("--shape", nargs="+", type=int, default=[1, 4, 128, 128])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--space", default="eps", choices=["eps", "flow"])
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--carry", nargs="*", type=int, default=[], help="extra aidi_anderson rows with these carry values")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-ms", type=float, default=None, help="cost of one model call (default: TinyUNet, measured)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    bootstrap()
    from inversion_suite.tests.analytic import karras, uniform_flow
    from inversion_suite.solvers import METHODS, invert
    x = torch.randn(*a.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    sig = karras(a.steps) if a.space == "eps" else uniform_flow(a.steps, 0.98)
    call = a.model_ms if a.model_ms is not None else model_ms(a.shape, a.threads)
    rows = []
    runs = [(n, n, {}) for n in a.methods or list(METHODS)]
    runs += [(f"aidi_anderson carry={c}", "aidi_anderson", {"carry": c}) for c in a.carry]
    runs.append(("floor of a checked step: start + 2 evaluations", None, {}))
    for name, method, kw in runs:
        best = None
        for _ in range(a.repeat):
            den = Gaussian(a.space)
            t = time.process_time()
            inv = invert(method, den, x, sig, space=a.space, **kw) if method else checked_steps(den, x, sig, a.space)
            spent = time.process_time() - t - den.seconds
            if best is None or spent < best[0]:
                best = (spent, inv, den.calls)
        spent, inv, calls = best
        rows.append((name, calls / a.steps, 1e3 * spent / a.steps, len(inv.unconverged) if method else "-"))
    ddim = next((r[2] for r in rows if r[0] == "ddim"), None)
    print(f"latent {'x'.join(map(str, a.shape))}, {a.space}, {a.steps} steps, {a.threads} thread(s), torch "
          f"{torch.__version__}; one model call: {call:.1f} ms ({'given' if a.model_ms is not None else 'TinyUNet, measured'})")
    print("| method | model calls / step | solver ms / step | vs DDIM | share of a step | unconverged |")
    print("|---|---|---|---|---|---|")
    for name, nfe, ms, unc in rows:
        share = ms / (ms + nfe * call)
        print(f"| {name} | {nfe:.1f} | {ms:.2f} | {ms / ddim if ddim else float('nan'):.1f}x | {100 * share:.1f}% | {unc} |")


if __name__ == "__main__":
    main()
