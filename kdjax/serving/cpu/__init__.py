"""The CPU decode's C++ kernels (`kernels.cc`, called through XLA's FFI) and the weights packed for them."""
