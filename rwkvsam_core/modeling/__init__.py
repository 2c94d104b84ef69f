"""Model building blocks: RWKV backbone, SAM prompt encoder / mask decoder / ViT, refine module."""
