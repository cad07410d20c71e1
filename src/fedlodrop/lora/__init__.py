"""The adapter maths of FedLoDrop: what a LoRA adapter is (`adapter`), which rows and columns a
device keeps (`masks`), what a dropout variant lets it see and train (`variants`), how the server
aggregates (`aggregation`), and what travels between them (`messages`). Pure functions on tensors:
no model, no data, no engine."""
