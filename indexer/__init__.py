"""Indexer: the encoder, the collection reader, the metadata store, FAISS indexes and the CLI."""
