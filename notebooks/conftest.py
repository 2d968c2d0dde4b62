import os

# The test suite executes the notebook with a short run; the committed outputs are
# those of the full 100-step run.
os.environ.setdefault("EQX_NORM_NOTEBOOK_STEPS", "10")
