"""llmops: the platform's spine (settings, the `llmops` CLI, the model catalog, the local stack)."""
