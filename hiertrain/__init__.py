"""hiertrain: HierTrain's hybrid-parallel DNN training over device, edge and cloud, through MQTT.

The core package holds what every tier shares: the wire format (:mod:`hiertrain.net.wire`), topic
names (:mod:`hiertrain.net.topics`), the MQTT transport (:mod:`hiertrain.net.transport`) and the CLI.
Tier services live in the top-level ``device``, ``edge`` and ``cloud`` packages, the broker
service in ``broker`` and the planner in ``planner``.
"""

__version__ = "0.1.0"

TIERS: tuple[str, ...] = ("device", "edge", "cloud")
"""The three machines of a mobile-edge-cloud deployment, nearest to the data first."""

ACCOUNTS: tuple[str, ...] = TIERS + ("planner", "observer")
"""Broker accounts: one per tier, one for the planner, and a read-only one for people and dashboards."""

MODEL_NAMES: tuple[str, ...] = ("lenet5", "alexnet", "alexnet-small", "vgg16", "vgg19", "resnet34", "googlenet")
"""The model zoo's names (:data:`hiertrain.train.models.MODELS`), known without importing onnx."""

MAX_BATCH = 1 << 16
"""The largest batch a job may plan or train (beyond it, plans need absurd memory)."""
