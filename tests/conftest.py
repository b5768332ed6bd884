import os

# Triton kernels must see the interpreter flag before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
