"""Family pipelines over the shared runner (``flowcache.runner``): each supplies its schedule and model call."""
from .common import LatentCodec, LatentGeometry
from .diffusion_forcing import DFSettings, DiffusionForcingPipeline, StepInfo, plan_windows

__all__ = ["LatentCodec", "LatentGeometry", "DFSettings", "DiffusionForcingPipeline", "StepInfo", "plan_windows"]
