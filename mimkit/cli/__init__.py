"""mimkit's command lines: one module per command, each with ``main(argv=None, prog=None) -> int``.

``mimkit COMMAND ...`` (the console script, :mod:`mimkit.cli.main`) and ``python tools/<name>.py ...``
(thin wrappers for a checkout) run the same ``main``. Nothing here is imported by ``import mimkit``;
the benchmark tool stays outside the package (``tools/benchmark.py``).
"""
