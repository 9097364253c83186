"""SAM training on Kubernetes: model, recipe, distributed engine.

Importing this package has no side effects; see the subpackages.
"""

__version__ = "0.1.0"
