"""KV-cache compression for chunked autoregressive video models (FlowCache §2, after R-KV).

``scoring`` holds the pure scoring and selection functions; it keeps no state and knows nothing about a host.
"""
