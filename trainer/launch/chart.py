"""Facts of ``charts/sam-train/Chart.yaml`` that the job builder needs, kept in the package.

The builder runs from a pip-installed wheel without the chart, so these are copies;
``tests/unit/test_launch_build.py`` checks them against Chart.yaml.
"""

from __future__ import annotations

CHART_NAME = "sam-train"
CHART_VERSION = "0.1.0"
APP_VERSION = "0.1.0"
#: ``app.kubernetes.io/managed-by`` of the builder's objects (Helm writes ``Helm``).
MANAGED_BY = "sam-train-launch"
#: Longest full name: pod names (``<name>-worker-31``) must stay DNS labels.
MAX_FULLNAME = 40
