"""Embedding store: precompute SAM embeddings once (Ray Data -> Parquet), load zero-copy."""
from .loader import EmbeddingStore, fetch_store, publish_store
from .shards import StoreError

__all__ = ["EmbeddingStore", "StoreError", "fetch_store", "publish_store"]
