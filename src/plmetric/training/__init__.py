"""Training: the loop in named stages and everything it drives.

:mod:`~plmetric.training.loop` is the loop (:func:`train`), :mod:`~plmetric.training.stages` the
stages that set a run up (data, networks, bank and batches); :mod:`~plmetric.training.passes` the
full passes over a data set (bank refresh, evaluation); :mod:`~plmetric.training.runs` the run
folder and the exact training state; :mod:`~plmetric.training.optimization` AdamW and the schedule;
:mod:`~plmetric.training.networks` the student's frozen stages, tail and PCA-initialised layer;
:mod:`~plmetric.training.sampling` the memory bank, the batch samplers and the EMA teacher;
:mod:`~plmetric.training.cached` ``train.mode`` head and tail (views cached once, the estimate, the
checkpoint as the whole image model); :mod:`~plmetric.training.report` what training changed; :mod:`~plmetric.training.estimate` an
end-to-end run's expected minutes.

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`, :mod:`plmetric.data`,
:mod:`plmetric.evaluation`, :mod:`plmetric.config`, :mod:`plmetric.methods`. Importing this
package imports none of its modules (``from plmetric.training.loop import train``).
"""
