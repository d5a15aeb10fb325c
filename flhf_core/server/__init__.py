"""The server side: what the ServerApp runs.

- :mod:`.main` — :func:`~.main.run_federation`, the ServerApp's entry point: prepare, resume, run, finish;
- :mod:`.federation` — the round loop (configure, send and receive through the Grid, aggregate, evaluate, record);
- :mod:`.strategy` — :class:`~.strategy.FeedbackFedAvg`, with reply screening (:mod:`.screening`, :mod:`.replies`)
  and the aggregation math (:mod:`.aggregation`, pure functions);
- :mod:`.state` — the server's data, global model and held-out evaluation;
- :mod:`.reporting`, :mod:`.run_output` — a round's rows and the run's output;
- :mod:`.reward_models`, :mod:`.reward_pool` — the server side of shared reward models.

Never imports :mod:`flhf_core.client`.
"""
