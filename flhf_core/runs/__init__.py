"""Run plumbing: how a person starts FLHF.

- :mod:`.cli` — the ``flhf`` command; :mod:`.launcher` starts a simulation SuperLink and follows a run;
- :mod:`.deploy`, :mod:`.credentials` — the loopback deployment (SuperLink, SuperNodes, TLS, node keys);
- :mod:`.api` — :func:`~.api.run_flhf_simulation`, a run from Python;
- :mod:`.inprocess` — a federation in one process, without Flower's engines (tests, debugging);
- :mod:`.compare` — ``flhf compare``: runs side by side;
- :mod:`.watchdog` — stops what a launcher started once the launcher is gone, however it ended.
"""
