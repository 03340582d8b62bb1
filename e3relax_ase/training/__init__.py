"""Training: the data, the distillation that makes more of it, and the trainer.

Three parts (imports between them are free: ``training/`` is one room of the layer map):

* :mod:`.data`: training pairs: the pair file (``pairs``), the in-memory set (``pairset``)
  and its ASE frames (``pair_frames``); importers, splits, data cards, seed structures,
  perturbations and chemical families;
* :mod:`.distill`: distillation from a teacher potential: the batched FIRE driver
  (``batched_relax``), its inputs, results and sanity checks (``batched_results``) and cell
  filter maths (``frechet``), the SevenNet teacher, ``make_pairs`` (``distill``) and the
  generators of user-like inputs (``inputs``);
* :mod:`.train`: the config, the prepared dataset and its batching, the loss and metrics,
  the trainer (``trainer``), what a finished run hands on (``export``) and the evaluation.
"""
