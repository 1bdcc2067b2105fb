"""clinfed: federated tumour segmentation for hospital consortia on NVIDIA FLARE."""

__version__ = "0.1.0"
