"""Run reports that the KFP UI renders and that a local run writes beside its outputs.

``html`` is the toolkit (one escaping table, page, inline PNG, boxes drawn on images, Markdown
table); one module per stage renders that stage's report from its merge summary.
"""
