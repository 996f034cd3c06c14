"""KFP components: one module per stage, each a thin layer over ``vlprep.stages.<stage>``.

Bodies import vlprep inside the function: only the body is shipped in the compiled YAML, and it runs
in our image (``config.IMAGES``) where vlprep and the same kfp version are installed.
"""
