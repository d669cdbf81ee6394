"""Models for tests/test_distributed.py, importable by the processes torchrun starts."""
import torch


def wrong_shape():
    """A factory whose model drops a feature: generate must fail on every rank, not hang."""
    return lambda x, t: x[:, :1]


def slow_mixture():
    """The ring mixture's epsilon model, 2 ms per call: long enough runs to kill a worker in the middle."""
    import time

    from diffkern.models import mixture_model

    model = mixture_model()

    def eps(x, t):
        time.sleep(0.002)
        return model(x, t)

    return eps


NOT_CALLABLE = 3.0


def identity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x


def slow_mlp(sample_shape, delay: float = 0.01, **kwargs):
    """train's MLP, `delay` seconds slower per call: a run long enough to kill between checkpoints."""
    import math
    import time

    from diffkern.training import TimeMLP

    class Slow(TimeMLP):
        def forward(self, x, t):
            time.sleep(delay)
            return super().forward(x, t)

    return Slow(math.prod(sample_shape), **kwargs)


def two_features(sample_shape):
    """A network that drops features: train must refuse it before writing anything."""

    class Drop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return self.scale * x[:, :1]

    return Drop()
