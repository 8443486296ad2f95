"""saekit: sparse autoencoders for language-model activations and text embeddings."""

__version__ = "0.1.0"
