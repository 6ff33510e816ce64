"""The one front door: a model as every job needs it. `open_model(source, revision)` gives the
checkpoint (a directory, a hub id, or a GGUF file), its typed config, its family, the weights
its forward runs on (dequantized on demand for a GGUF file or a GPTQ/AWQ checkpoint), where its
tokenizer is, and the BOS rule (the id the tokenizer puts first, or None). Convert, imatrix and
eval all open models here; no GGUF metadata is built for a job that writes none."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qconvert.families import family_for
from qconvert.arch.base import Family
from qconvert.errors import InputError
from qconvert.layouts import layout_of
from qconvert.read.checkpoint import Checkpoint, open_checkpoint
from qconvert.read.gguf_model import open_gguf
from qconvert.quant.activations import ActivationQuant
from qconvert.read.quantized import DequantizedLinear, dequantized_view


@dataclass
class Model:
    source: str  # what the user named
    family: Family
    weights: object | None  # what the forward reads (HF name -> tensor); None: the checkpoint's own
    bos: int | None  # the id each sample or chunk starts with, or None when the tokenizer adds none
    n_vocab: int
    tokenizer_dir: Path | None  # where tokenizer.json / tokenizer.model are, if anywhere
    ckpt: Checkpoint | None = None  # None for a GGUF file
    kind: str = "float"  # "float", "gguf", or the quant_method of a quantized checkpoint
    acts: ActivationQuant | None = None  # a quantized checkpoint's run-time activation quantization
    label: str = "float"  # a quantized checkpoint's method as --to names it (gptq, w8a8, fp8-block ...)
    _close: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def bos_known(self) -> bool:
        """False for a checkpoint saved without its tokenizer (AutoAWQ's, for one): then nobody
        knows whether its tokenizer adds a BOS, and eval asks the base model."""
        return self.kind == "gguf" or self.tokenizer_dir is not None

    def forward(self, activations: bool = False):
        """The family's forward on this model's weights; `activations`: with the loader's
        quantization of each quantized linear's input where the checkpoint asks for one."""
        fw = self.family.forward(self.weights)
        if activations and self.acts is not None and self.acts.simulated:
            fw.quantize_inputs(self.acts, frozenset(n[:-len(".weight")] for n, t in self.weights.items()
                                                    if isinstance(t, DequantizedLinear)))
        return fw

    def close(self) -> None:
        for fn in self._close:
            fn()
        self._close.clear()


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()


def open_model(source: str, revision: str | None = None) -> Model:
    """A GGUF file, or a Hugging Face checkpoint (a directory or a hub id; float, or a GPTQ/AWQ
    checkpoint), checked before any compute: every tensor its family needs, with the shapes its
    config gives."""
    p = Path(source).expanduser()
    if p.is_file():
        if not is_gguf(p):
            raise InputError(f"{p}: not a GGUF file (give a .gguf file, or a model directory or hub id)")
        g = open_gguf(p)
        return Model(str(p), g.family, g.weights, g.bos_id, g.n_vocab, None, kind="gguf")
    ckpt = open_checkpoint(source, revision)
    try:
        family = family_for(ckpt)
        found = layout_of(ckpt.config)
        weights = None
        if found is not None:  # read as a float checkpoint, each quantized linear decoded when read
            ckpt.tensors = family.own_names(dequantized_view(ckpt.tensors, family, *found, ckpt.config))
            weights = {n.replace("language_model.", ""): t for n, t in ckpt.tensors.items()}
            family.check_tensors(lambda n: weights[n].shape if n in weights else None, ckpt.path)
        else:
            family.check_checkpoint()
        family.forward(weights)  # reads and checks every config value the forward needs; no tensor yet
        tok = ckpt.path if has_tokenizer(ckpt.path) else None
        bos = family.bos_id() if tok is not None else None
        return Model(source, family, weights, bos, family.cfg.positive(int, "vocab_size"), tok, ckpt,
                     found[0].method if found else "float", found[1].acts if found else None,
                     found[0].label(found[1]) if found else "float", [ckpt.close])
    except BaseException:
        ckpt.close()
        raise
