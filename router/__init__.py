"""HTTP front door: OpenAI-compatible API, tokenization, discovery and routing."""
