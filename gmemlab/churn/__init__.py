"""``gmemlab churn``: the host's direct map after a modelled day of VMs coming and going.

:mod:`schedule` draws the day (seeded, the same for every design), :mod:`rules`
learns a design's effect on a 2 MiB region from its real model, :mod:`regions`
runs the day a region at a time, :mod:`full` runs it on the full model (to
validate the region level, and for designs it cannot state), :mod:`report`
prints, sums up and plots it.
"""
