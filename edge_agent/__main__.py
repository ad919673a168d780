"""`python -m edge_agent run ...`: the agent commands without the `homefleet` wrapper."""

from edge_agent.cli import app

app(prog_name="edge_agent")
