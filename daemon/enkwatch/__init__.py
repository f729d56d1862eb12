"""enkwatch: watch Enkrypt AI dataset-generation tasks and emit one event per transition."""

__version__ = "0.1.0"
