"""The kind end-to-end test, its offline checks, and the kustomize generator (``python -m tests.e2e.manifests``)."""
