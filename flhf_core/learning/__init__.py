"""The learning code: torch and transformers, nothing of Flower's messages.

- :mod:`.model` — the model and tokenizer: build, load, parameters to and from records;
- :mod:`.generate`, :mod:`.batches`, :mod:`.metrics` — summaries, batches, loss and the quality figures;
- :mod:`.algorithms` — one file per local update (SFT, best-of-n, REINFORCE, PPO, DPO) and the scorer;
- :mod:`.reward_model` — the learned reward model.

Imports none of the server, client, runs or results.
"""
