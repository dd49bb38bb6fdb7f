"""Denoising loops. Each pipeline owns its loop and asks a cache policy 'compute or reuse?'."""
from .diffusion_forcing import DFSettings, DiffusionForcingPipeline, LatentGeometry, StepInfo, plan_windows
