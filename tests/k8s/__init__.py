"""Test helpers for the Kubernetes side: render the Helm chart offline, validate objects.

- :mod:`tests.k8s.render`: the chart ``charts/sam-train`` rendered by the real Helm v4 library
  (``helm-python-sdk``), with capabilities, values schema and ``fail`` messages as Helm gives them.
- :mod:`tests.k8s.validate`: schema validation as strict as a real API server with kubectl's
  default ``--validate=strict``: core kinds through ``kubernetes-validate``, custom kinds against
  the upstream CRDs in ``../shared/crds``.
"""
