"""Checkpoint converters: MTP split/merge, re-quantization, resharding and expert placement."""
