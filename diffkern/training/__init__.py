"""Training what diffkern samples: fused objectives (``training_loss``), reproducible batches
(``draws``), and the ``train`` command's loop (``trainer``)."""
from .draws import BatchKey
from .loss import TrainingBatch, training_loss
from .objectives import (
                         OBJECTIVES,
                         DDPMObjective,
                         EDMObjective,
                         FlowMatchingObjective,
                         Objective,
                         ScoreMatchingObjective,
                         make_objective,
)

__all__ = ["OBJECTIVES", "BatchKey", "DDPMObjective", "EDMObjective", "FlowMatchingObjective", "Objective",
           "ScoreMatchingObjective", "TrainingBatch", "make_objective", "training_loss"]
