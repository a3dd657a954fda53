"""Inference requests: wire models, the request context, its hooks and pipeline, the upstream
call, stream relaying and spans."""
