"""Kubeflow Pipelines definitions (compiled YAML in compiled/)."""
