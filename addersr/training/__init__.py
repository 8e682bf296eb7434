"""Training, one concern a module; ``python -m addersr.train`` builds the parts and runs them.

:mod:`.config` (recipes, options into a run's config), :mod:`.schedule` (the learning-rate
schedule), :mod:`.optim` (optimisers, adder options), :mod:`.checkpoint` (checkpoint format,
RNG state, ``--init``), :mod:`.distributed` (process group, collective decisions),
:mod:`.distill` (teacher and distillation losses), :mod:`.trainer` (the loop and export),
:mod:`.preflight` (what is checked before the first step), :mod:`.lock` (one run per
``--out``), :mod:`.recovery` (messages after a stop, a lowered rate on ``--resume``).
"""
