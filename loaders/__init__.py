"""Clip loaders behind one batch contract (DALI, PyAV, synthetic)."""
