"""FLHF ClientApp: one user. Thin adapters over flhf_core.client.handlers."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flhf_core.client import handlers

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return handlers.train(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return handlers.evaluate(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return handlers.identify(message, context)
