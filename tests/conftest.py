"""Load the pack as the package ``inversion_suite``, the way ComfyUI loads it from its folder.

The pack's root is never put on ``sys.path``: its ``nodes/`` package would shadow the
host's ``nodes.py``.
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "inversion_suite" not in sys.modules:
    spec = importlib.util.spec_from_file_location("inversion_suite", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["inversion_suite"] = module
    spec.loader.exec_module(module)
