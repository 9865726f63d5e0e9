"""The base every layer stands on: small helpers with no knowledge of the method.

Argument checks (:mod:`~plmetric.core.validation`), the typed option objects with their defaults
and the registry of training methods by name (:mod:`~plmetric.core.options`), the one device
resolver (:mod:`~plmetric.core.devices`), DDP helpers (:mod:`~plmetric.core.distributed`),
crash-test fault points (:mod:`~plmetric.core.faults`) and safe, atomic persistence: files,
safetensors checkpoints and their JSON metadata (:mod:`~plmetric.core.checkpoint`); where the
inference runtime caches its exports (:mod:`~plmetric.core.runtime_cache`, no torch); what a path
is before it is opened (:mod:`~plmetric.core.files`); names as people see them (:mod:`~plmetric.core.names`).

May import: nothing else of plmetric (the bottom layer). Importing this package imports none of
its modules.
"""
