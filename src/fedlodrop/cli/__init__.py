"""The `fedlodrop` command: typer apps that parse, call the library and print (`app`; the Flower
commands in `flower`, the planner's in `planning`, what they share in `common`)."""

from fedlodrop.cli.app import app, main

__all__ = ["app", "main"]
