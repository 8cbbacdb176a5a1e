"""Optical flow: compute (TV-L1, DIS, Farneback), quantize, store, and the extract-flow pipeline."""

from datp.flows.compute import DEFAULT_PRESETS, FLOW_PRESETS, FlowComputer, compute_flow
from datp.flows.quantize import dequantize, quantize

__all__ = ["DEFAULT_PRESETS", "FLOW_PRESETS", "FlowComputer", "compute_flow", "dequantize",
           "quantize"]
