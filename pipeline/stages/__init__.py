"""The pipeline's stages: exactly dvc.yaml's, one module each, named as the stage."""
