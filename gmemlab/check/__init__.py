"""The interleaving checker (``gmemlab check``)."""
