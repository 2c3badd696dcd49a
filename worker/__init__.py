"""Inference worker: model loading, paged-KV engine, gRPC server."""
