"""Kubeflow Pipelines v2: validate the dataset -> train (a PyTorchJob) -> evaluate -> export.

- :mod:`pipelines.components`: the lightweight Python components (each step's code);
- :mod:`pipelines.sam_pipeline`: the pipeline, and ``python -m pipelines.sam_pipeline --out
  pipelines/sam_pipeline.yaml`` to compile it to IR YAML;
- :mod:`pipelines.submit`: ``python -m pipelines.submit --host URL --param k=v`` (kfp.Client).

Needs the ``kfp`` extra (``pip install 'sam-k8s-trainer[kfp]'``), in its own environment:
kfp 2.17 cannot share one with torchx 0.7.0. Importing this package imports nothing.
"""
