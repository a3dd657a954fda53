"""Retrieval evals: runs that search vector stores (`vector_store_search`), their data source,
one item's run, and the metrics."""
