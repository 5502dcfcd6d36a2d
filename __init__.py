"""Inversion Suite: accurate diffusion inversion and editing nodes for ComfyUI.

The nodes import the host only when ComfyUI asks for them, so ``solvers`` and
``benchmarks`` load without ComfyUI.
"""

# Served by ComfyUI at /extensions/<pack folder>/; the frontend reads a node's help page from
# docs/<node_id>.md there. A string only: this module must not import the host.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import InversionSuiteExtension

    return InversionSuiteExtension()
