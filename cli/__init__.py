"""The `shapeflow` command (installed as the `shapeflow_cli` package): parsing and printing only."""
