"""Inversion and sampling methods in the host's sigma space: pure torch, no ComfyUI import."""

from .core import EPS, FLOW, SPACES, NonFiniteError, SolverError
from .record import Inversion
from .registry import (DEFAULT, METHODS, SAMPLERS, Method, Sampler, Setting, check_record, invert, method,
                       reconstruct, sampler_for)

__all__ = ["EPS", "FLOW", "SPACES", "Inversion", "NonFiniteError", "SolverError", "DEFAULT", "METHODS", "SAMPLERS",
           "Method", "Sampler", "Setting", "check_record", "invert", "method", "reconstruct", "sampler_for"]
