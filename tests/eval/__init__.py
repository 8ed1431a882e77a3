"""Tests of mimkit.eval; ``separable`` builds features that are linearly separable by construction."""

import torch


def separable(n_per_class: int, num_classes: int = 10, dim: int = 32, seed: int = 0, noise: float = 0.3):
    """Train and test features around the same well-separated class centres (norm 4).

    Returns ``(x_train, y_train, x_test, y_test)``, ``n_per_class`` samples of each class in each
    split. With the default noise every class is linearly separable from the others (its centre is
    its own best direction) and a point's nearest neighbours are points of its class.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 4
    labels = torch.arange(num_classes).repeat(n_per_class)
    x = [centres[labels] + noise * torch.randn(len(labels), dim, generator=g) for _ in range(2)]
    return x[0], labels, x[1], labels.clone()


def single_thread():
    """Run a test with one intra-op thread: tiny heads on a shared 2-core machine are far faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
