"""Feature discovery: contrastive packs, their scoring (shared with the RL reward), layer maps, ReasonScore."""
