"""The benchmark's entry point: every inversion method on the bundled TinyUNet.

    python benchmarks/run.py                        # bundled default: a few minutes on 2 cores
    python benchmarks/run.py --all --batch 8 --steps 10 20 50 100 --cfg 1 3 5   # fuller
    python benchmarks/run.py --quick                # seconds: a smoke run

Writes results.md, results.json, psnr_vs_nfe.png and grid.png to --out
(benchmarks/out/ by default, git-ignored).
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: spinning threads hurt on a shared machine

HERE = pathlib.Path(__file__).resolve().parent


def bootstrap():
    """The benchmark module, the pack loaded as ``inversion_suite`` (``pack.py``)."""
    from pack import load
    load()
    import inversion_suite.benchmarks.reconstruction as rb
    return rb


def main(argv=None):
    p = argparse.ArgumentParser(description="Reconstruction benchmark of every inversion method on the bundled TinyUNet.")
    p.add_argument("--spaces", nargs="+", default=["eps", "flow"], choices=["eps", "flow"])
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    p.add_argument("--cfg", nargs="+", type=float, default=[1.0, 3.0])
    p.add_argument("--batch", type=int, default=4, help="held-out patches per run")
    p.add_argument("--methods", nargs="+", default=None, help="case names (default: every method and the exact limits)")
    p.add_argument("--all", action="store_true", help="add tight-tolerance fixed_point (slow) to the cases")
    p.add_argument("--no-mixture", action="store_true", help="skip the analytic-mixture iteration study")
    p.add_argument("--quick", action="store_true", help="10 steps, cfg 1, batch 2: a smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=pathlib.Path, default=None,
                   help="folder with tinyunet_<space>.safetensors (default: the bundled benchmarks/weights)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "out")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.cfg, a.batch = [10], [1.0], 2
    import torch
    torch.set_num_threads(a.threads)
    rb = bootstrap()
    case_list = rb.cases(full=a.all or bool(a.methods))
    if a.methods:
        unknown = set(a.methods) - {c.name for c in case_list}
        if unknown:
            p.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(c.name for c in case_list)}")
        case_list = [c for c in case_list if c.name in a.methods]
    weights = {s: a.weights / f"tinyunet_{s}.safetensors" for s in a.spaces} if a.weights else None
    t0 = time.perf_counter()
    rows, recs, originals = rb.benchmark(a.spaces, a.steps, a.cfg, a.batch, case_list, weights=weights)
    mix = None if a.no_mixture else rb.mixture_study()
    seconds = time.perf_counter() - t0
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rb.write(rows, recs, originals, a.out, mix, dict(command=command.strip(), seconds=seconds, batch=a.batch))
    print((a.out / "results.md").read_text())
    print(f"wrote {a.out}/results.md, results.json, psnr_vs_nfe.png, grid.png in {seconds:.0f} s")


if __name__ == "__main__":
    main()
