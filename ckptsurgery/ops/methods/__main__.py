"""`python -m ckptsurgery.ops.methods`: prints docs/merging.md's methods table, generated from the
declarations (paste it between the page's markers; a test holds the page to it)."""

from . import methods_table

print(methods_table(), end="")
