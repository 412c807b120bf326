"""What runs outside the trusted zone: the detector's tail on Triton. It never sees pixels,
only the noisy activation that crossed the wire."""
