"""jobgate: an API gateway and orchestration service for long-running ML jobs.

Users write stages as Python functions; jobgate stores jobs durably, runs their stages
on workers, streams their progress and serves their results.
"""

from jobgate.pipelines import FileRule, InputFile, Pipeline, Registry, Stage, StageContext

__version__ = "0.1.0"

__all__ = [
    "FileRule",
    "InputFile",
    "Pipeline",
    "Registry",
    "Stage",
    "StageContext",
    "__version__",
]
