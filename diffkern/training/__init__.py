"""Training what diffkern samples: fused objectives (``training_loss``), reproducible batches
(``draws``), and the ``train`` command's loop (``trainer``)."""
from .data import BUILTIN, load_dataset
from .draws import BatchKey
from .loss import TrainingBatch, training_loss
from .models import ConcatSquashMLP, ConvUNet, EDMPrecond, FieldHead, TimeMLP, TimeScaled
from .objectives import (
    OBJECTIVES,
    CNFObjective,
    DDPMObjective,
    EDMObjective,
    FlowMatchingObjective,
    Objective,
    PFGMObjective,
    ScoreMatchingObjective,
    make_objective,
)
from .pretrained import PRETRAINED, load_pretrained
from .toy_data import TOY_DATASETS, sample_toy, toy_log_density
from .trainer import TrainConfig, load_checkpoint, train

__all__ = ["BUILTIN", "OBJECTIVES", "TOY_DATASETS", "BatchKey", "CNFObjective", "ConcatSquashMLP", "ConvUNet",
           "DDPMObjective", "EDMObjective", "EDMPrecond", "FieldHead",
           "FlowMatchingObjective", "Objective", "PFGMObjective", "ScoreMatchingObjective", "TimeMLP", "TimeScaled",
           "PRETRAINED", "TrainConfig", "TrainingBatch", "load_checkpoint", "load_pretrained", "load_dataset",
           "make_objective", "sample_toy", "toy_log_density", "train", "training_loss"]
