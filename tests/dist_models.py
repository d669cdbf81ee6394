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
