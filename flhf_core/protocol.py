"""The message keys the ClientApp and the ServerApp both use, in one place.

Both sides import this module; neither imports the other's code. A reply carries the
user's parameters (``arrays``, train only), its figures (``metrics``) and a ConfigRecord
naming the user (``user``), so that the server can attribute replies to users rather
than to Flower's random node ids.
"""

from __future__ import annotations

ARRAYS = "arrays"  # ArrayRecord: parameters (shared ones only)
CONFIG = "config"  # ConfigRecord: the round's instructions from the server
METRICS = "metrics"  # MetricRecord: a reply's figures
# reward-model = federated | clustered, feedback rounds only:
REWARD_MODEL = "reward-model"  # ArrayRecord in a train reply: the user's reward model after the round
REWARD_MODELS = "reward-model-"  # ArrayRecords "reward-model-0", "-1", ... in a train message: the server's
REWARD_ASSIGNMENT = "reward-model-assignment"  # ConfigRecord in a train message: the user's "cluster"
CLUSTER = "cluster"
# ... and in the train reply's metrics:
REWARD_JUDGEMENTS = "train-reward-model-judgements"  # judgements the user's reward model learned from
CLUSTER_OF_USER = "reward-model-cluster"  # the cluster whose model the user used this round
CLUSTER_LOSSES = "reward-model-cluster-losses"  # list: each received model's loss on those judgements
# MetricRecord in a train reply: the evaluation of the model the user received (the previous
# round's global model), so that a round needs one message per user, not two
EVALUATION = "evaluation"

USER_RECORD = "user"  # ConfigRecord in every reply, naming the user who sent it
USER_ID = "user-id"  # its partition id
NUM_USERS = "num-users"  # the node's num-partitions (in identification replies)

# ConfigRecord keys the server sets in every train and evaluate message
SERVER_ROUND = "server-round"
PHASE = "phase"
RUN_NAME = "run-name"
TOKENIZER_SHA256 = "tokenizer-sha256"
TOKENIZER_JSON = "tokenizer-json"
LEARNING_RATE = "learning-rate"
EVALUATE_RECEIVED = "evaluate-received"  # train messages: also evaluate the received model
OWN_DATA = "own-data"  # identification replies: the user holds its own data file

# MetricRecord lists in evaluations: each held-out document's true utility and content (ROUGE-L
# F1 against the user's aspect), in the user's report order; "-personal" for the personalized model
JUDGED_UTILITY = "judged-utility"
JUDGED_CONTENT = "judged-content"
JUDGED_LENGTH = "judged-length"
# and a 52-bit digest of each summary (exact in a float): whether two users got the same text
# can be told without the text leaving the device
SUMMARY_DIGEST = "summary-digest"
