"""Model definitions built from tusk.kernels ops."""
