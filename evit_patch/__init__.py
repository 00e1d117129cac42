"""EViT token reorganization for timm Vision Transformers."""
