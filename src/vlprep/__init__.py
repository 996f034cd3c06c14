"""vlprep: vision-and-language feature preparation.

The package computes; it never imports kfp. Components and pipelines (outside the package) are thin
layers that call the stage functions (``vlprep.stages.<name>``: plan, extract, merge, ...).
"""

__version__ = "0.1.0"


class VlprepError(Exception):
    """An error a user can fix: the message names the file or setting and says what to do."""
