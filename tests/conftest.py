import os

from hypothesis import settings

# Triton kernels must see the interpreter flag before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs the same examples every time (a clean clone must pass or fail deterministically);
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
