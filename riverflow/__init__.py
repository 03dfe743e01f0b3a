"""riverflow: the composition root.

Settings, the pipeline spec, the CLI, the local stack (Kafka + Redis without
Docker) and the runtimes that host the processors of ``streams``.
"""

__version__ = "0.1.0"
