"""Training, evaluation and export machinery for acmix-ms (used by train.py, eval.py, export.py).

Modules: ``config`` (option schema, YAML + command line), ``data`` (ImageFolder pipelines),
``losses``, ``optim`` (optimizers, decay groups, warm-up + cosine), ``step`` (the compiled train step,
EMA, loss scaling), ``checkpoint`` (atomic training-state files and when to write them; reading and loading
weights is ``models.weights``), ``metrics``, ``logger``, ``runtime`` (context, msrun data parallel, model
building), ``trainer`` (the loop), ``export`` (MINDIR / ONNX / AIR with a check), ``fashion_mnist`` (the
demo data set's files) and ``tasks`` (classification, detection, segmentation).
"""
