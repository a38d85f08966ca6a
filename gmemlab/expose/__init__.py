"""Exposure analysis: which secret bytes a host-kernel gadget can reach, at every kernel step.

* :mod:`gmemlab.expose.tracker`: the attacker and its incremental bookkeeping;
* :mod:`gmemlab.expose.scenario`: a modelled host driven one system call at a time;
* :mod:`gmemlab.expose.workloads`: the workloads, one per exposure window;
* :mod:`gmemlab.expose.analysis`: every design on every workload, tables and plots.
"""
