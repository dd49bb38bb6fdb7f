"""Cache methods: one small file per method (off, TeaCache, FlowCache, MagCache, EasyCache), one registry,
plain settings."""
from .base import AccumulatedL1Policy, CachePolicy, UnitState, relative_l1
from .easycache import EasyCacheConfig, EasyCachePolicy
from .flowcache import FlowCacheConfig, FlowCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .off import OffConfig, OffPolicy
from .registry import ATTENTION, KV_DTYPES, KV_PLACEMENTS, METHODS, REUSE, CacheMethod, CacheSettings, make_policy, residuals_kept
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = ["EasyCacheConfig", "EasyCachePolicy", "MagCacheConfig", "MagCachePolicy", "AccumulatedL1Policy", "CachePolicy", "UnitState", "relative_l1", "FlowCacheConfig", "FlowCachePolicy",
           "OffConfig", "OffPolicy", "ATTENTION", "KV_DTYPES", "KV_PLACEMENTS", "REUSE", "METHODS", "CacheMethod", "CacheSettings", "make_policy", "residuals_kept", "TeaCacheConfig",
           "TeaCachePolicy"]
