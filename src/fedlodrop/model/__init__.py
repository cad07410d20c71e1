"""The one frozen backbone with PEFT LoRA that every simulated device shares (`backbone`), what its
classifier reads (`pooling`, and the mean-pooled head class an export carries:
`modeling_mean_pooled`), and in which precision it runs."""
