"""FLHF ClientApp: one user. Thin adapters over flhf_core.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flhf_core import client

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return client.train(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return client.evaluate(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return client.identify(message, context)
