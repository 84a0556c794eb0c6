"""sdpipe: a versioned, orchestrated pipeline that trains Stable-Diffusion-style text-to-image models."""

__version__ = "0.1.0"
