"""Task networks built around a timm encoder (UperNet for semantic segmentation)."""
