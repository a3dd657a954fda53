"""Retrieval for RAG: parsing, chunking, embedding, the Qdrant store and hybrid search."""
