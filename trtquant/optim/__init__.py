"""pytorch-quantization's ``optim``: parameter grouping and freezing helpers for QAT (``optim.helper``)."""
