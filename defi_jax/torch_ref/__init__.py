"""PyTorch re-statements of the reference modules (parity tests and export); imports torch."""
