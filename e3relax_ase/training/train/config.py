"""Training configuration: one frozen dataclass, read from YAML, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from e3relax_ase.config import ModelConfig, from_dict_strict


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (the model's hyperparameters under ``model``).

    Attributes:
        train_data, val_data: pair files (npz, ``e3relax_ase.training.data.pairs`` format); lists
            are concatenated.
        out_dir: where the training state, the log and the exported checkpoint go.
        model: ModelConfig fields.
        batch_size: crystals per optimiser step (per process under DDP): at most this many
            when ``batch_atoms`` is set, exactly this many otherwise (0 = no count limit).
        batch_atoms, batch_edges: fill each batch up to this many atoms and graph edges
            (0 = no limit): a step's cost follows atoms and edges, not crystals.
        lr, weight_decay: AdamW. ``lr`` is the rate of a batch of ``lr_reference_atoms``
            atoms when that is set, and scales with sqrt(batch_atoms / lr_reference_atoms):
            larger batches average out more noise and take larger steps.
        warmup_epochs: the learning rate rises linearly from 0 over this many epochs (large
            batches and large rates diverge without it).
        compile: run each layer's message passing compiled by torch.compile (CUDA).
        prepare_workers: processes that prepare the pairs (0 = one per CPU core).
        lr_factor, lr_patience, min_lr: ReduceLROnPlateau on validation coordinate MAE.
        ema_decay: exponential moving average of the weights used for evaluation and export.
        grad_clip: max global gradient norm.
        layer_weights: alpha_t of the loss per layer; empty means ones.
        lattice_weight: weight of the lattice L1 term relative to PACD.
        max_epochs, early_stop_patience: stop after this many epochs, or when validation has
            not improved for this many epochs.
        amp: bfloat16 autocast on CUDA (measured against float32 before enabling it).
        seed: seeds the weights and the per-epoch data order (resumes reproduce it exactly).
        time_budget_minutes: stop cleanly at an epoch boundary before this much wall time
            (for 10-minute GPU calls); 0 means no budget. A resumed run continues.
        val_max_pairs: evaluate on at most this many validation pairs (0 = all).
        cache_dir: keep prepared (canonicalised, graph-built) data here between runs; "" = off.
        init_from: start from the weights of this checkpoint (name or path; fine-tuning); its
            model config must equal ``model``. "" = random initialisation.
    """

    train_data: tuple = ()
    val_data: tuple = ()
    out_dir: str = "runs/default"
    model: dict = field(default_factory=dict)
    batch_size: int = 32
    batch_atoms: int = 0
    batch_edges: int = 0
    lr: float = 3e-4
    lr_reference_atoms: int = 0
    warmup_epochs: float = 0.0
    compile: bool = False
    prepare_workers: int = 0
    weight_decay: float = 1e-5
    lr_factor: float = 0.5
    lr_patience: int = 5
    min_lr: float = 1e-6
    ema_decay: float = 0.999
    grad_clip: float = 10.0
    layer_weights: tuple = ()
    lattice_weight: float = 1.0
    max_epochs: int = 200
    early_stop_patience: int = 20
    amp: bool = False
    seed: int = 0
    time_budget_minutes: float = 0.0
    val_max_pairs: int = 0
    cache_dir: str = ""
    init_from: str = ""

    def __post_init__(self):
        object.__setattr__(self, "train_data", tuple([self.train_data] if isinstance(self.train_data, str) else self.train_data))
        object.__setattr__(self, "val_data", tuple([self.val_data] if isinstance(self.val_data, str) else self.val_data))
        object.__setattr__(self, "layer_weights", tuple(self.layer_weights))
        ModelConfig.from_dict(self.model)  # reject unknown model keys early
        if self.batch_size < 0 or (self.batch_size == 0 and self.batch_atoms <= 0) or self.lr <= 0 or self.max_epochs < 1:
            raise ValueError("batch_size (or batch_atoms), lr and max_epochs must be positive")
        if min(self.batch_atoms, self.batch_edges, self.lr_reference_atoms) < 0 or self.warmup_epochs < 0:
            raise ValueError("batch_atoms, batch_edges, lr_reference_atoms and warmup_epochs must not be negative")
        if self.lr_reference_atoms and not self.batch_atoms:
            raise ValueError("lr_reference_atoms scales the rate by batch_atoms, which is not set")
        if self.model_config.architecture != "strain":
            raise ValueError(f"architecture {self.model_config.architecture!r} is kept to load old checkpoints only; train the 'strain' architecture")
        if self.layer_weights and len(self.layer_weights) != self.model_config.num_layers:
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {self.model_config.num_layers} layers")

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def effective_lr(self) -> float:
        """The peak learning rate: ``lr`` scaled to the batch (see ``lr``)."""
        if self.lr_reference_atoms:
            return self.lr * (self.batch_atoms / self.lr_reference_atoms) ** 0.5
        return self.lr

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for key in ("train_data", "val_data", "layer_weights"):
            values[key] = list(values[key])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return from_dict_strict(cls, values, "training config")

    @classmethod
    def from_yaml(cls, path) -> TrainConfig:
        import yaml

        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping")
        return cls.from_dict(values)
