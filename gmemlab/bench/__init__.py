"""``gmemlab bench``: the model at VM sizes, operation by operation, next to the real kernel.

:mod:`.lifecycle` runs one guest's life on the model and times each operation
(one process per size, so its peak RSS is that size's); :mod:`.run` runs the
sizes and the real kernel's measurement (``gmemlab.twin.measure``) and
:mod:`.report` puts them in one table, checks the scale targets and compares
with an earlier run's JSON.
"""
