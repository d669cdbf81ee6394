"""The digits' quality measures (diffkern.training.digit_metrics): the shipped classifier reproduces its
recorded accuracy, the measures sit at their floor on real digits and far from it on noise, the
Frechet distance matches scipy's matrix square root, memorisation shows, bad input is named."""
import pytest
import torch

from diffkern.training import data, digit_metrics


def test_the_shipped_classifier_reproduces_its_recorded_accuracy():
    x, labels = data.digits("test", labels=True)
    with torch.no_grad():
        accuracy = float((digit_metrics.load_classifier()(x).argmax(1) == labels).double().mean())
    # recorded by tools/train_digit_classifier.py: 0.9900 (297 of 300); one image of slack for another
    # CPU's convolution rounding
    assert abs(accuracy - 0.99) <= 1 / 300 + 1e-12


def test_real_digits_score_at_the_floor_and_noise_far_from_it():
    test = data.digits("test")
    itself = digit_metrics.metrics(test)
    assert abs(itself["fd"]) < 1e-6 and itself["precision"] == 1.0 and itself["recall"] == 1.0
    floor = digit_metrics.floor()
    # measured: fd 10.3, coverage_tv 0.009, precision 0.91, recall 0.91, nearest_train 1.95
    assert floor["fd"] < 20 and floor["coverage_tv"] < 0.05 and min(floor["precision"], floor["recall"]) > 0.85
    assert 1.5 < floor["nearest_train"] < 2.5
    noise = digit_metrics.metrics(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    # measured: fd 1111, precision 0.01, recall 0.0, nearest_train 6.9
    assert noise["fd"] > 50 * floor["fd"] and noise["recall"] < 0.05 and noise["precision"] < 0.1
    assert noise["nearest_train"] > 2 * floor["nearest_train"]
    assert abs(sum(noise["class_shares"]) - 1.0) < 1e-12


def test_memorised_samples_show_as_zero_distance_to_the_training_set():
    train = data.digits("train")
    copied = digit_metrics.metrics(train[:300])
    assert copied["nearest_train"] == 0.0


def test_one_digit_only_is_caught_by_coverage():
    x, labels = data.digits("train", labels=True)
    ones = x[labels == 1][:100]
    scores = digit_metrics.metrics(ones)
    assert scores["coverage_tv"] > 0.8 and scores["recall"] < 0.3  # one class of ten: TV 0.9 at most


def test_frechet_distance_against_scipys_matrix_square_root():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = b + 0.7
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    root = scipy_linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace()) - 2 * float(root.trace())
    assert abs(digit_metrics.frechet_distance(a, b) - expected) < 1e-9 * max(1.0, abs(expected))


@pytest.mark.parametrize("samples,match", [
    (torch.zeros(10, 3, 8, 8), "samples"), (torch.zeros(3, 64), "samples"),
    (torch.full((10, 64), float("nan")), "non-finite"), ("digits", "samples"),
])
def test_bad_samples_are_named(samples, match):
    with pytest.raises(ValueError, match=match):
        digit_metrics.metrics(samples)


@pytest.mark.slow
def test_the_recipe_remakes_a_classifier_as_good():
    x, labels = data.digits("test", labels=True)
    model = digit_metrics.train_classifier(epochs=20)
    with torch.no_grad():
        assert float((model(x).argmax(1) == labels).double().mean()) > 0.97
