"""Headless side of Diffusion SAE: ``python -m training <command>``."""
