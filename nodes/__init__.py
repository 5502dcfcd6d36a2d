"""ComfyUI adapters over ``solvers``: schemas, input checks, LATENT/CONDITIONING conversion."""

from comfy_api.latest import ComfyExtension

from .invert import Invert
from .reconstruct import Reconstruct
from .sampler import InversionSampler

NODES = [Invert, Reconstruct, InversionSampler]


class InversionSuiteExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)
