"""Kubeflow Pipelines components, one module per concern (data, training, evaluation, the seed recipes' steps).

Each component is thin: KFP compiles its body into the spec and runs it in the trainer image, where it hands its
artifacts to one function of teleguard.pipeline.steps through teleguard.pipeline.artifacts.
"""
