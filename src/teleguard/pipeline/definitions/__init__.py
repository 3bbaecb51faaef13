"""The pipeline definitions, one module each (the registry, teleguard.pipeline.registry, maps the CLI's keys to
them), built from the shared parameters and sub-pipelines of `shared`."""
