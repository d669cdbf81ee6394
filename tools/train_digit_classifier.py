"""Makes diffkern/datasets/digit_classifier.pt, the classifier behind diffkern.training.digit_metrics
(digits-FD, coverage, precision / recall): train_classifier(seed=0, epochs=60) on the digits' training
split, then prints its test-split accuracy and the file's sha256.

    python tools/train_digit_classifier.py"""
import hashlib

import torch

from diffkern.training import data, digit_metrics


def main() -> None:
    model = digit_metrics.train_classifier()
    x, labels = data.digits("test", labels=True)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).double().mean())
    torch.save(model.state_dict(), digit_metrics.CLASSIFIER_PATH)
    with open(digit_metrics.CLASSIFIER_PATH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{digit_metrics.CLASSIFIER_PATH}: test accuracy {accuracy:.4f}, sha256 {digest}")


if __name__ == "__main__":
    main()
