"""ComfyUI adapters over ``solvers``: schemas, input checks, LATENT/CONDITIONING conversion."""

from comfy_api.latest import ComfyExtension

from .blended import BlendedGuidanceSampler
from .invert import Invert
from .io_nodes import LoadInversion, SaveInversion
from .reconstruct import Reconstruct
from .report import ReconstructionReport
from .sampler import InversionSampler
from .stochastic import StochasticEditSampler

NODES = [Invert, Reconstruct, InversionSampler, BlendedGuidanceSampler, StochasticEditSampler,
         SaveInversion, LoadInversion, ReconstructionReport]


class InversionSuiteExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)
