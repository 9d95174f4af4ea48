"""Official benchmark metrics as functions and torchmetrics Metrics, each checked against its official definition."""
