"""kerasbn: Batch Normalization for Keras 3 (TensorFlow backend).

Public API:
    BatchNormalization    the layer: fused XLA training kernel, moving-average or population
                          (the paper's Algorithm 2) inference statistics
"""

from kerasbn import _quiet_import  # noqa: F401  (first: silences TensorFlow start-up)
from kerasbn.layer import BatchNormalization

__all__ = ["BatchNormalization"]
__version__ = "0.1.0"
