"""Pure-PyTorch building blocks (no Lightning): attention, Transformer layers, PC layer, beam search."""
