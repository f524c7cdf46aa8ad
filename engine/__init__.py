"""Training, evaluation and export machinery for acmix-ms (used by train.py, eval.py, export.py).

Modules: ``config`` (option schema, YAML + command line), ``data`` (ImageFolder pipelines),
``losses``, ``optim`` (optimizers, decay groups, warm-up + cosine), ``step`` (the compiled train step,
EMA, loss scaling), ``checkpoint`` (atomic files, strict loading), ``metrics``, ``logger``, ``runtime``
(context, msrun data parallel, model building) and ``trainer`` (the loop).
"""
