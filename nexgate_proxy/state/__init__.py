"""Shared hot state: the invalidation bus and the one Redis client plugins run their scripts on."""
