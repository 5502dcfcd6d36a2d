"""Load the pack as the package ``inversion_suite``, the way ComfyUI loads it from its folder.

The pack's root is never put on ``sys.path``: its ``nodes/`` package would shadow the host's
``nodes.py``. The benchmark scripts import this module as a sibling (their folder is on
``sys.path`` when they run as scripts); ``tests/conftest.py`` runs it by path.
"""

import importlib.util
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(root=ROOT):
    """The pack at ``root`` as ``inversion_suite`` (the one already loaded, if any)."""
    if "inversion_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("inversion_suite", pathlib.Path(root) / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        sys.modules["inversion_suite"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["inversion_suite"])
    return sys.modules["inversion_suite"]


def comfyui(root=ROOT):
    """The ComfyUI checkout to run against: ``COMFYUI_PATH``, else the one whose ``custom_nodes/`` holds
    the pack at ``root``; None where neither names one."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return pathlib.Path(env)
    root = pathlib.Path(root)
    if root.parent.name == "custom_nodes" and (root.parent.parent / "comfy").is_dir():
        return root.parent.parent
    return None
