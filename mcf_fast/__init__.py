"""mcf_fast: fast, lean MCF (Mask Contrastive Face) pre-training.

Importing the package touches neither CUDA nor global torch settings. It does import torch: the
compiled extension mcf_fast._C links against torch's libraries (libc10.so, ...), which the dynamic
loader finds only once torch is loaded, so `import mcf_fast._C` works on its own.
"""
import torch  # noqa: F401  (loads libc10/libtorch for mcf_fast._C)

__version__ = "0.1.0"
