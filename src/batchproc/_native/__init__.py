"""Compiled hot path: request heap, batch assembly, rolling percentile window."""
