"""Runs INSIDE the trusted zone: sees raw pixels, emits only noisy activations."""
