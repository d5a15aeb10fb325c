"""The data: the corpus (:mod:`.corpus`: ACLSum, a local file or a hub dataset) and what each
document is for, held-out, reward, validation or training, and which user holds it
(:mod:`.partitions`).

Imports none of the server, client, runs or results.
"""
