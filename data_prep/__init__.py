"""Tokenisation scripts: corpus -> uint16 token shards (numpy and tiktoken, never torch)."""
