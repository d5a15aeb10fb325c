"""The simulated users: who they are (:mod:`.profiles`) and how they judge a summary
(:mod:`.feedback`, with ROUGE from :mod:`.rouge`). No torch.

Imports none of the server, client, learning, runs or results.
"""
