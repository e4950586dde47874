"""Leaving co2_tf: export (.keras, SavedModel) and PyTorch weights."""
