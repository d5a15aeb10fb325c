"""The client side: what a user's device runs.

- :mod:`.handlers` — the ClientApp's train, evaluate and query handlers (``client_app`` calls them);
- :mod:`.session` — one message's user session: config, model, documents, built once per process and cached;
- :mod:`.documents` — the user's documents (a share of the corpus, or the node's own data file);
- :mod:`.evaluation` — what the user measures of a model;
- :mod:`.update` — the local update: SFT or feedback, FedRep's order with personal parameters;
- :mod:`.personal` — the parameters that stay on the device (``Context.state`` and the node's state folder);
- :mod:`.reward_models`, :mod:`.reward_state` — the client side of learned reward models;
- :mod:`.faults` — a rogue user for fault campaigns (off unless ``FLHF_FAULT_INJECTION=1``).

Never imports :mod:`flhf_core.server`.
"""
