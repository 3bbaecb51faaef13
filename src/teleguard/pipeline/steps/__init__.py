"""What each Kubeflow Pipelines step does, as plain functions over folders, by concern: `data` (datasets and
audio), `training` (start model, stages, rejection sampling, teacher), `evaluation` (offline, live, seed-recipe
reports, KFP metrics) and `registration` (the quality gate and the registry).

The KFP components (teleguard.pipeline.components) are thin: each hands its artifacts to one function here
through `teleguard.pipeline.artifacts`. The same functions run in a pod on the cluster and in KFP's local runner
on this machine. A stage that the pipeline's parameters switch off passes its input model through, so every
step's artifacts exist whichever stages ran.
"""
