"""Training what diffkern samples: fused objectives (``training_loss``), reproducible batches
(``draws``), and the ``train`` command's loop (``trainer``)."""
from .data import BUILTIN, load_dataset
from .draws import BatchKey
from .loss import TrainingBatch, training_loss
from .models import EDMPrecond, FieldHead, TimeMLP, TimeScaled
from .objectives import (
    OBJECTIVES,
    DDPMObjective,
    EDMObjective,
    FlowMatchingObjective,
    Objective,
    PFGMObjective,
    ScoreMatchingObjective,
    make_objective,
)
from .trainer import TrainConfig, load_checkpoint, train

__all__ = ["BUILTIN", "OBJECTIVES", "BatchKey", "DDPMObjective", "EDMObjective", "EDMPrecond", "FieldHead",
           "FlowMatchingObjective", "Objective", "PFGMObjective", "ScoreMatchingObjective", "TimeMLP", "TimeScaled",
           "TrainConfig", "TrainingBatch", "load_checkpoint", "load_dataset", "make_objective", "train",
           "training_loss"]
