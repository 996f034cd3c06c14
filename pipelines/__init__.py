"""KFP pipelines: one per workflow (named as its stage, CLI command and components), plus ``demo``
composing them. Registry in ``PIPELINES``; ``cli.py`` holds ``vlprep run / compile / submit``."""

from vlprep_pipelines import demo as _demo
from vlprep_pipelines.captions import captions
from vlprep_pipelines.context import context
from vlprep_pipelines.regions import regions
from vlprep_pipelines.vokens import vokens
from vlprep_pipelines.xlxmert import xlxmert

PIPELINES = {
    "captions": captions,
    "context": context,
    "demo": _demo.demo,
    "regions": regions,
    "xlxmert": xlxmert,
    "vokens": vokens,
}

# pipeline -> function(sample_dir, run_dir) giving the parameters of a local run on the sample
LOCAL_PARAMS = {
    "demo": _demo.local_params,
}
