"""The reproduction pipeline: ``python train.py reproduce --preset mini``.

A reproduction is a graph of stages, each an ordinary run a user could type by hand:

- ``stages.py``   what a stage is, its cache key and the commands it runs (``train.py fit`` / ``test``, or
                  ``python -m pipeline.measure NAME``);
- ``presets.py``  the stage graphs: ``mini`` (CPU), ``paper`` (GPUs), ``tiny`` (CI tests);
- ``runner.py``   runs the stages in order in subprocesses: caching, resume, failure reports;
- ``outputs.py``  reads what a run wrote (metrics.csv, robust_accuracy.json, the constructed-data grid);
- ``measure.py``  the measurement stages (Nakkiran's transfer table, Figure 3);
- ``claims.py``   the papers' tables: published numbers and the qualitative claims as predicates;
- ``figures.py``  / ``report.py``  results.json, results.md and the figures;
- ``cli.py``      the ``reproduce`` command line.
"""
