"""Pipelines: the Python API users write. Nothing here does I/O of jobgate's."""

from jobgate.pipelines.context import StageContext
from jobgate.pipelines.files import FileRule, InputFile
from jobgate.pipelines.pipeline import Pipeline, Stage
from jobgate.pipelines.registry import Registry

__all__ = ["FileRule", "InputFile", "Pipeline", "Registry", "Stage", "StageContext"]
