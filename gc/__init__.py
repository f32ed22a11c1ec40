"""Storage reclamation: retention policies and mark-and-sweep collectors.

Installed as ``replicator.gc`` because a top-level ``gc`` would shadow CPython's
built-in garbage-collector module.
"""
