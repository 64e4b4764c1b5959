"""Models: image diffusion backbones (trained and cached, or loaded), feature encoders, feature diffusion."""
