"""kolors: a lean PyTorch engine for the Kolors text-to-image model."""
