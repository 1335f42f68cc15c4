"""Triton kernels, installed as ``omninft_fast.kernels``; they know nothing of the trainer."""
