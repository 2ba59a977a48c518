"""Segmentation networks (MONAI), their training and inference; see models/README.md."""
