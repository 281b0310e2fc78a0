"""Shard packing tools: make_shards (WebDataset tars + DALI indices)."""
