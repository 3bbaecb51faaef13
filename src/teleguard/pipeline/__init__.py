"""The Kubeflow pipelines: SAFE-QAQ and the seed-recipe variants, compiled, run locally and submitted.

- `registry`: the pipelines by CLI key (`safe-qaq`, `rm-dpo`, ...); `definitions/`: one module per pipeline,
  built from `definitions.shared` (the parameters declared once, the pool placement, the sub-pipelines).
- `components/`: the KFP components, thin; `artifacts`: the one adapter they use (artifacts -> folders, metrics
  -> JSON); `steps/`: what each step does, as plain functions over folders.
- `cluster`: compile and submit; `local`: run with KFP's local runner; `arguments`, `progress`, `summary`,
  `demo_serving`: a local run's arguments file, progress lines, summary and serving demo; `cli`: the commands.

Importing this package imports no KFP: components run `teleguard.pipeline.steps` in their pods.
"""
