"""CPU demo: MoCo v3 pre-training of a small ViT on scikit-learn's digits, judged by frozen-feature kNN."""
