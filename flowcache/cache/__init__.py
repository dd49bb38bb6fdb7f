"""Cache methods: one small file per rule (off, TeaCache's accumulated L1 which FlowCache applies per chunk,
MagCache, EasyCache), one registry, plain settings."""
from .accumulated_l1 import AccumulatedL1Config, AccumulatedL1Policy
from .base import CachePolicy, UnitState, relative_l1
from .cfg import CFG_REUSE, CfgReuse
from .easycache import EasyCacheConfig, EasyCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .off import OffConfig, OffPolicy
from .registry import (ATTENTION, KV_DTYPES, KV_PLACEMENTS, METHODS, PATHS, REUSE, CacheMethod, CacheSettings,
                       make_policy, residuals_kept)

__all__ = ["AccumulatedL1Config", "AccumulatedL1Policy", "ATTENTION", "CacheMethod", "CachePolicy", "CacheSettings",
           "CFG_REUSE", "CfgReuse",
           "EasyCacheConfig", "EasyCachePolicy", "KV_DTYPES", "KV_PLACEMENTS", "MagCacheConfig", "MagCachePolicy",
           "METHODS", "OffConfig", "OffPolicy", "PATHS", "REUSE", "UnitState", "make_policy", "relative_l1",
           "residuals_kept"]
