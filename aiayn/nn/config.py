"""The model's hyper-parameters, with the paper's Table 3 presets."""

import dataclasses
import json
from dataclasses import dataclass

__all__ = ["TransformerConfig", "PRESETS"]


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`aiayn.nn.Transformer` (Vaswani et al., 2017, Table 3).

    ``d_k = d_v = d_model / num_heads``. ``dropout`` is the paper's P_drop: applied to every
    sub-layer output before the residual add and to the sums of embeddings and positional encodings
    (§5.4). ``attention_dropout`` (on the attention probabilities) and ``ffn_dropout`` (on the FFN's
    hidden activation) are not in the paper and off by default. ``label_smoothing`` is ε_ls (§5.4),
    read by the training code, not by the model. ``pad_id`` tokens are masked out of attention when no
    padding mask is passed (set ``pad_id=None`` to never derive one).
    """

    num_layers: int = 6
    d_model: int = 512
    d_ff: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    src_vocab_size: int = 37000
    tgt_vocab_size: int = 37000
    share_embeddings: bool = True
    norm_first: bool = False
    label_smoothing: float = 0.1
    pad_id: int | None = 0
    bos_id: int = 1
    eos_id: int = 2
    attention_dropout: float = 0.0
    ffn_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    max_len: int = 1024

    def __post_init__(self):
        for name in ("num_layers", "d_model", "d_ff", "num_heads", "src_vocab_size", "tgt_vocab_size", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig: '{name}' must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig: 'd_model' ({self.d_model}) must be divisible by "
                             f"'num_heads' ({self.num_heads})")
        for name in ("dropout", "attention_dropout", "ffn_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TransformerConfig: '{name}' must be in [0, 1), got {value!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"TransformerConfig: 'layer_norm_eps' must be > 0, got {self.layer_norm_eps!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"TransformerConfig: share_embeddings=True needs one shared vocabulary, but "
                             f"src_vocab_size={self.src_vocab_size} != tgt_vocab_size={self.tgt_vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value is None and name == "pad_id":
                continue
            if not isinstance(value, int) or not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"TransformerConfig: '{name}' must be a token id below the vocabulary sizes, "
                                 f"got {value!r}")

    @property
    def d_k(self):
        return self.d_model // self.num_heads

    @classmethod
    def preset(cls, name, src_vocab_size=37000, tgt_vocab_size=None, **overrides):
        """A preset (``"base"``, ``"big"`` from Table 3, ``"small"`` for corpora of 10k-1M pairs,
        ``"tiny"`` for tests and the demo) with
        the given vocabulary sizes (``tgt_vocab_size`` defaults to ``src_vocab_size``) and any field
        overridden."""
        if name not in PRESETS:
            raise ValueError(f"TransformerConfig.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name], src_vocab_size=src_vocab_size,
                      tgt_vocab_size=src_vocab_size if tgt_vocab_size is None else tgt_vocab_size)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"TransformerConfig.preset: unknown field(s) {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))


# Table 3 of the paper: N, d_model, d_ff, h, P_drop, eps_ls (d_k = d_v = d_model / h). The big
# model's P_drop is 0.3 for EN-DE (0.1 for EN-FR, §6.1).
PRESETS = {
    "base": dict(num_layers=6, d_model=512, d_ff=2048, num_heads=8, dropout=0.1, label_smoothing=0.1),
    "big": dict(num_layers=6, d_model=1024, d_ff=4096, num_heads=16, dropout=0.3, label_smoothing=0.1),
    "tiny": dict(num_layers=2, d_model=64, d_ff=256, num_heads=4, dropout=0.1, label_smoothing=0.1),
    # For corpora of 10k-1M pairs, where base over-fits and trains too slowly on a CPU. Chosen by
    # measurement on Multi30k (29k pairs, 8000-piece shared BPE, 2500-token batches, warm-up 400):
    # dev BLEU 34.6 after 30 minutes on 2 CPU cores.
    "small": dict(num_layers=3, d_model=256, d_ff=1024, num_heads=4, dropout=0.1, label_smoothing=0.1),
}
