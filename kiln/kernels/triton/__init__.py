"""@triton.jit kernels only; launched from kiln/kernels/<op>.py."""
