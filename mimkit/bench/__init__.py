"""Benchmarks behind ``tools/benchmark.py``; each module has ``add_args(parser)`` and ``run(args) -> dict``.

- :mod:`~mimkit.bench.peak`: matmul throughput at a model's shapes (the utilisation denominator).
- :mod:`~mimkit.bench.step`: one training step through the trainer path vs a bare reference MAE step.
- :mod:`~mimkit.bench.pipeline`: end-to-end pretraining throughput, real data vs pre-decoded tensors.
- :mod:`~mimkit.bench.masks`: time to draw a batch of masks per mask type.
- :mod:`~mimkit.bench.incontext`: in-context retrieval queries/s against memory size.
"""
