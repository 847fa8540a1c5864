"""Shared layers that carry logical axis names, so any model built from them shards."""
