"""What a finished run gives a user: a model folder for transformers or PEFT (`export`), and
predictions for new text (`predict`)."""
