"""KFP pipelines: one per workflow, plus ``demo`` composing them. Registry in ``PIPELINES``."""

from vlprep_pipelines import demo as _demo
from vlprep_pipelines.captions import captions
from vlprep_pipelines.crossmodal_context import crossmodal_context
from vlprep_pipelines.region_features import region_features

PIPELINES = {
    "captions": captions,
    "crossmodal_context": crossmodal_context,
    "demo": _demo.demo,
    "region_features": region_features,
}

# pipeline -> function(sample_dir, run_dir) giving the parameters of a local run on the sample
LOCAL_PARAMS = {
    "demo": _demo.local_params,
}
