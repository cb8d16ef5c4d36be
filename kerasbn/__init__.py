"""kerasbn: Batch Normalization for Keras 3 (TensorFlow backend).

Public API:
    BatchNormalization    the layer: fused XLA training kernel, moving-average or population
                          (the paper's Algorithm 2) inference statistics
    population_statistics Algorithm 2 for a trained model: one pass over data sets every BN
                          layer's inference statistics (keras or kerasbn layers)
    PopulationStatistics  the callback running that pass at the end of fit (and every n epochs)
"""

from kerasbn.callbacks import PopulationStatistics
from kerasbn.layer import BatchNormalization
from kerasbn.population import population_statistics

__all__ = ["BatchNormalization", "PopulationStatistics", "population_statistics"]
__version__ = "0.1.0"
