"""ViT, the MCF model, heads and teachers."""
