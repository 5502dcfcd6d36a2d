"""The ComfyUI nodes: one file per node (or pair of nodes), a schema and a few lines of execute;
the glue they share with the host is in ``host/``."""

from comfy_api.latest import ComfyExtension

from .blended_guidance import BlendedGuidanceSampler
from .flowedit import FlowEdit
from .invert import Invert
from .inversion_sampler import InversionSampler
from .reconstruct import Reconstruct
from .report import ReconstructionReport
from .rf_inversion import RFInversionEdit
from .save_load import LoadInversion, SaveInversion
from .stochastic_edit import StochasticEditSampler

NODES = [Invert, Reconstruct, InversionSampler, BlendedGuidanceSampler, StochasticEditSampler,
         SaveInversion, LoadInversion, ReconstructionReport, FlowEdit, RFInversionEdit]


class InversionSuiteExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)
