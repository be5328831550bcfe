"""splitlearn: fine-tune transformers split between edge devices and the cloud."""

__version__ = "0.1.0"
