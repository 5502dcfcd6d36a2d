"""Inversion Suite: accurate diffusion inversion and editing nodes for ComfyUI.

The nodes import the host only when ComfyUI asks for them, so ``solvers`` and
``benchmarks`` load without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import InversionSuiteExtension

    return InversionSuiteExtension()
