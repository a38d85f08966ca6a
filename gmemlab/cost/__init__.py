"""The cost of direct map removal: per-event costs calibrated on this machine, strategies compared.

* :mod:`gmemlab.cost.model`: what each counted kernel event costs, and how a
  flush's IPI round trip grows with the number of CPUs;
* :mod:`gmemlab.cost.calibrate`: those costs fitted to a ``gmemlab measure`` of
  this machine (a committed one in ``data/``, another file, or a live run);
* :mod:`gmemlab.cost.workloads` and :mod:`gmemlab.cost.analysis`: every strategy
  (a design of :mod:`gmemlab.model.designs`) on the same workloads, counts scaled
  to the requested size, priced, with the exposure of :mod:`gmemlab.expose`;
* :mod:`gmemlab.cost.plots`: slowdown against CPU count, fragmentation, exposure
  against cost.
"""
