"""mmtrain: a DeepSpeed ZeRO-3 trainer for interleaved image-text models."""

__version__ = "0.1.0"
