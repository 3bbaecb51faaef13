"""Kubeflow Pipelines components: one per step, each a thin call into the teleguard library."""
