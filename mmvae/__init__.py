"""mmvae: multimodal variational autoencoders for clinical imaging case retrieval."""
__version__ = "0.1.0"
