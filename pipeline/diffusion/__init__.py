"""The model: components, tokenizers, VAE pixel/latent conversion, the noise schedule."""
