"""Export-friendly nn.Modules for every component of the seed families.

Modules allocate nothing derived at construction time (rope tables, mel filters and KV caches are
computed in forward or set up explicitly), so a model built on the meta device is complete once
its checkpoint tensors are assigned.
"""
