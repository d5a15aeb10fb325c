"""What a run leaves: the run folder's files and plots (:mod:`.tracking`), the MLflow sink
(:mod:`.mlflow_sink`), checkpoints for exact resume (:mod:`.checkpoint`) and the record of a
round (:mod:`.rounds`).

Never imports :mod:`flhf_core.server` or :mod:`flhf_core.client`.
"""
