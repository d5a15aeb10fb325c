"""FLHF ServerApp: reads the run config and runs the federation (see flhf_core.server.main)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flhf_core.server.main import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context)
