"""Load the pack as the package ``inversion_suite``, the way ComfyUI loads it from its folder
(``benchmarks/pack.py``); its root is never put on ``sys.path``."""

import pathlib
import runpy

runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pack.py"))["load"]()
