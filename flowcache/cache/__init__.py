"""Cache methods: one small file per method (off, TeaCache, FlowCache chunkwise), one registry, plain settings."""
from .base import AccumulatedL1Policy, CachePolicy, UnitState, relative_l1
from .flowcache import FlowCacheConfig, FlowCachePolicy
from .off import OffConfig, OffPolicy
from .registry import METHODS, CacheMethod, CacheSettings, make_policy
from .teacache import TeaCacheConfig, TeaCachePolicy

__all__ = ["AccumulatedL1Policy", "CachePolicy", "UnitState", "relative_l1", "FlowCacheConfig", "FlowCachePolicy",
           "OffConfig", "OffPolicy", "METHODS", "CacheMethod", "CacheSettings", "make_policy", "TeaCacheConfig",
           "TeaCachePolicy"]
