"""mcf_fast: fast, lean MCF (Mask Contrastive Face) pre-training.

Importing the package touches neither CUDA nor global torch settings.
"""
__version__ = "0.1.0"
