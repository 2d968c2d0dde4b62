"""The SAM comparison: every method's run, and what the comparison concludes."""
