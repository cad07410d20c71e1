"""fedlodrop: federated LoRA fine-tuning with row/column dropout (FedLoDrop, IEEE JSAC 2026)."""

__version__ = "0.1.0"
