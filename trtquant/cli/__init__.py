"""The ``trtquant`` command line."""
