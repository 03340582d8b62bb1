"""Inference: ``OneShotRelaxer`` (``relaxer``) over the forward pass (``predict``), the worker
pool that prepares and judges structures (``pool``, ``pool_prepare``, ``pool_judge``), the checks
on every prediction (``sanity``, ``sanity_search``, ``sanity_batch``), refinement with a real
calculator (``refine``, ``calculators``, ``optimizer``), sharding over torchrun ranks
(``sharded``) and the process settings it needs (``threads``, ``heap``). Imports ``geometry``,
``nn`` and ``io``; never ``training``."""
