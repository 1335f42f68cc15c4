"""One module per equation: the public ops with their argument checks and PyTorch references."""
