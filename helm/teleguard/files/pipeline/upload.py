"""Upload the compiled teleguard pipeline to the KFP API (the chart's optional post-install Job).

The first run creates the pipeline; later runs add a version named PIPELINE_VERSION_PREFIX-<sha256 of the spec>
unless one with that name exists, so re-running the Job (helm upgrade) is idempotent. kfp.Client reads the
projected ServiceAccount token from KF_PIPELINES_SA_TOKEN_PATH.
"""

import hashlib
import os
import sys

import kfp

host, namespace = os.environ["KFP_HOST"], os.environ["KFP_NAMESPACE"]
name, spec = os.environ["PIPELINE_NAME"], os.environ["PIPELINE_SPEC"]
with open(spec, "rb") as handle:
    digest = hashlib.sha256(handle.read()).hexdigest()[:10]
version_name = f"{os.environ['PIPELINE_VERSION_PREFIX']}-{digest}"

client = kfp.Client(host=host, namespace=namespace)
pipeline_id = client.get_pipeline_id(name)
if pipeline_id is None:
    pipeline = client.upload_pipeline(spec, pipeline_name=name, description="teleguard SAFE-QAQ")
    print(f"uploaded pipeline {name} ({pipeline.pipeline_id})")
    sys.exit(0)
versions = client.list_pipeline_versions(pipeline_id, page_size=100).pipeline_versions or []
if any(v.display_name == version_name for v in versions):
    print(f"pipeline {name} already has version {version_name}")
    sys.exit(0)
client.upload_pipeline_version(spec, pipeline_version_name=version_name, pipeline_id=pipeline_id)
print(f"uploaded version {version_name} of pipeline {name}")
