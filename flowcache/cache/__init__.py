"""Cache policies: one small file per method (base rule, TeaCache, FlowCache chunkwise) and data presets."""
from .base import AccumulatedL1Policy, CachePolicy, UnitState, relative_l1
from .chunkwise import FlowCacheConfig, FlowCachePolicy
from .presets import CACHE_MODES, PRESET_NAMES, CacheSettings, load_presets, make_policy, resolve_settings
from .teacache import TeaCacheConfig, TeaCachePolicy
