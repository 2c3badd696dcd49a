"""Shared KV cache tier client (Redis/Valkey) and the worker-side host cache."""
