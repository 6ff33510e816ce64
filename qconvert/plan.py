"""The GGUF plan: a metadata-only pass that decides every GGUF output tensor's name, type and
size and every key/value of each file, and finds every problem (unmappable tensor, missing
tokenizer, rows that fit no block, existing or unwritable output, not enough disk) before any
tensor data is read. The plan is data; the writers are made from it when the files are written."""
from __future__ import annotations

import logging
import os
import struct
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import GGUFValueType as VT
from gguf.gguf_writer import GGUFValue

from qconvert.arch.base import Family
from qconvert.arch.spec import PlannedTensor
from qconvert.errors import InputError, OutputError, QConvertError, UsageError
from qconvert.quant.blocks import BlockType
from qconvert.quant.recipes import Overrides, Recipe, layer_order_key, requires_imatrix
from qconvert.model import Model
from qconvert.read.checkpoint import Checkpoint
from qconvert.read.imatrix import Imatrix
from qconvert.writers.atomic import check_replaceable_file, make_dirs, remove_dirs
from qconvert.writers.gguf import GGUFWriter, PackedValues, TensorInfo

QUANTIZATION_VERSION = 2


@dataclass
class OutputPlan:
    recipe: Recipe
    path: Path
    types: list[type[BlockType]]  # one per plan tensor
    kv: dict[str, GGUFValue]  # every key/value of the file
    infos: list[TensorInfo]
    weights: list | None  # per plan tensor: importance weights for its quantizer, or None; None until calibrated
    force: bool = False
    packed: PackedValues = field(default_factory=PackedValues)  # shared by a plan's outputs
    # --method gptq: the observer that rounded its decoder linears, whose spill holds their blocks
    feedback: object | None = None

    def use_imatrix(self, tensors: list[PlannedTensor], im: Imatrix) -> None:
        """Importance weights for this mixture's tensors from `im`, and the keys llama-quantize
        records for it."""
        self.weights = tensor_weights(tensors, self.types, im)
        self.kv.update(imatrix_kv(im))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.infos)

    def writer(self) -> GGUFWriter:
        return GGUFWriter(self.path, self.kv, self.infos, force=self.force, packed=self.packed)

    @property
    def file_size(self) -> int:
        return self.writer().file_size  # a writer that has not opened its file only packs the header


@dataclass
class Plan:
    model: Model
    tensors: list[PlannedTensor]
    outputs: list[OutputPlan]
    created_dirs: list[Path] = field(default_factory=list)  # output directories this run made (removed on failure)

    @property
    def ckpt(self) -> Checkpoint:
        return self.model.ckpt

    @property
    def family(self) -> Family:
        return self.model.family

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def needs_calibration(self) -> bool:
        return any(o.recipe.quantizes_like_llama_quantize and o.weights is None for o in self.outputs)

    def close_spills(self) -> None:
        for o in self.outputs:
            if o.feedback is not None:
                o.feedback.spill.close()

    def use_imatrix(self, im: Imatrix) -> list:
        """Give the mixtures that wait for one (output_plan left their weights None) their
        importance weights, made by calibration after planning, and the keys llama-quantize
        records for them; returns those outputs."""
        served = [o for o in self.outputs if o.recipe.quantizes_like_llama_quantize and o.weights is None]
        for o in served:
            o.use_imatrix(self.tensors, im)
        return served


def model_label(ckpt: Checkpoint) -> str:
    if Path(ckpt.source).expanduser().is_dir():
        return Path(ckpt.source).expanduser().resolve().name
    return ckpt.source.rstrip("/").split("/")[-1]


def output_paths(ckpt: Checkpoint, recipes: list[Recipe], output: Path | None) -> list[Path]:
    """Default: MODEL-TYPE.gguf in the current directory. `-o DIR/` (or an existing directory)
    puts them there; `-o FILE.gguf` names the file when there is one target."""
    names = [f"{model_label(ckpt)}-{r.label}.gguf" for r in recipes]
    if output is None:
        return [Path.cwd() / n for n in names]
    if output.is_dir() or str(output).endswith(os.sep) or output.suffix.lower() != ".gguf":
        return [output / n for n in names]
    if len(recipes) > 1:
        raise UsageError(f"-o {output}: several targets need an output directory, not a file name")
    return [output]


def write_vocab(family: Family, kv: gguf.GGUFWriter) -> None:
    """The family's tokenizer keys. Tokenizer files are read partly by other projects' code
    (tokenizers, sentencepiece, gguf's SpecialVocab), which fails on bad files with any error:
    each is reported as the input problem it is, naming the model directory."""
    try:
        family.write_vocab(kv)
    except QConvertError:
        raise
    except Exception as e:
        raise InputError(f"{family.ckpt.path}: cannot read the tokenizer files: {type(e).__name__}: {e}") from None


def metadata_kv(family: Family, tensors: list[PlannedTensor], packed: PackedValues | None = None) \
        -> dict[str, GGUFValue]:
    """Every key/value of the file, gathered with gguf's own helpers (authorship heuristics,
    special tokens) so keys, values and value types are those llama.cpp's converter writes.
    Each value is packed here, into `packed`, once for every file that will hold it."""
    ckpt = family.ckpt
    kv = gguf.GGUFWriter(None, family.arch_name)  # used only to collect key/values
    family.write_early_hparams(kv)
    kv.add_type(gguf.GGUFType.MODEL)
    total = sum(t.n_elements for t in tensors)
    hub_name = None if Path(ckpt.source).expanduser().is_dir() else ckpt.source
    for name in ("metadata", "gguf.gguf_writer", "gguf.vocab"):  # gguf's helpers chat on the root logger
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        meta = gguf.Metadata.load(None, ckpt.path, hub_name, total)
    except Exception as e:  # a malformed model card is not worth failing a conversion over
        raise InputError(f"{ckpt.path}: cannot read model metadata (README.md / config.json): {e}") from None
    if meta.name is None:
        meta.name = model_label(ckpt)
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(*parameter_counts(tensors))
    meta.set_gguf_meta_model(kv)
    family.write_hparams(kv, int(gguf.LlamaFileType.ALL_F32))  # file_type set per output below
    kv.add_quantization_version(QUANTIZATION_VERSION)
    write_vocab(family, kv)
    out = dict(kv.kv_data[0])
    packed = packed if packed is not None else PackedValues()
    for key, value in out.items():  # values come from config and tokenizer files: each must fit its type
        try:
            packed.pack(value)
        except (struct.error, ValueError, TypeError, OverflowError, UnicodeEncodeError):
            raise InputError(f"{ckpt.path}: {key} = {str(value.value)[:80]!r} cannot be stored as GGUF "
                             f"{value.type.name} (a value in config.json or the tokenizer files is out of range)") \
                from None
    return out


def parameter_counts(tensors: list[PlannedTensor]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, experts) as gguf's GGUFWriter.get_total_parameter_count counts
    them for the size label ("8x7B"): a stacked *_exps tensor adds one expert's share of it."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = t.n_elements
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-2 if ".bias" in t.name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def make_plan(model: Model, recipes: list[Recipe], paths: list[Path], force: bool = False, dry_run: bool = False,
              overrides: Overrides | None = None, imatrix: Imatrix | None = None, calibrate: bool = False) -> Plan:
    """The GGUF files `recipes` name, at `paths`. `imatrix`: importance weights for the mixtures,
    or `calibrate`: they will be computed (the tensor types depend only on there being some;
    use_imatrix() supplies them)."""
    family = model.family
    family.check_tokenizer()
    # one order for every output, llama-quantize's, so that one read feeds them all
    tensors = sorted(family.plan_tensors(), key=lambda t: layer_order_key(t.name))
    packed = PackedValues()
    kv = metadata_kv(family, tensors, packed)
    outputs = [output_plan(recipe, path, tensors, family, kv, force, overrides, imatrix, calibrate, packed)
               for recipe, path in zip(recipes, paths)]
    plan = Plan(model, tensors, outputs)
    try:
        check_outputs(plan, force, create=not dry_run)
    except BaseException:
        remove_dirs(plan.created_dirs)
        raise
    return plan


def output_plan(recipe: Recipe, path: Path, tensors: list[PlannedTensor], family: Family, kv: dict[str, GGUFValue],
                force: bool, overrides: Overrides | None, imatrix: Imatrix | None, calibrate: bool,
                packed: PackedValues) -> OutputPlan:
    """One GGUF output: every tensor's type, the file's key/values and its writer."""
    mixture = recipe.quantizes_like_llama_quantize
    im = imatrix if mixture else None  # convert-style targets (q8_0 ...) take no importance matrix
    calibrate = calibrate and recipe.takes_imatrix  # mxfp4_moe: an --imatrix file only, as llama-quantize's
    types = recipe.assign(tensors, family.shape(), overrides, has_imatrix=mixture and (im is not None or calibrate))
    if im is not None:
        weights = tensor_weights(tensors, types, im)
    elif mixture and calibrate:
        weights = None  # supplied by use_imatrix() once calibration has run
    else:
        weights = [None] * len(tensors)
    for t, ty in zip(tensors, types):
        if mixture and im is None and not calibrate and requires_imatrix(t.name, ty, recipe):
            raise UsageError(f"--to {recipe.name}: llama.cpp writes {t.name} as {ty.name} only from an importance "
                             "matrix; drop --no-calib (qconvert calibrates) or give --imatrix FILE")
        if not ty.fits(t.shape[-1]):
            raise UsageError(f"{t.name}: rows of {t.shape[-1]} do not fit {ty.name} (blocks of {ty.block}); "
                             "choose another type for it")
    # llama-quantize writes each tensor with ggml_n_dims dimensions (sizes of 1 at the end of
    # GGUF's order dropped: Qwen2-MoE's shared-expert gate {hidden, 1} becomes {hidden}); the
    # converter keeps them
    infos = [TensorInfo(t.name, n_dims_shape(t.shape) if mixture else t.shape, int(ty.ggml), ty.nbytes(t.shape))
             for t, ty in zip(tensors, types)]
    out_kv = dict(kv)
    if mixture:
        # llama-quantize copies the converted file's keys, then sets these two, which moves them last
        for key in ("general.quantization_version", "general.file_type"):
            out_kv[key] = out_kv.pop(key)
    ftype = recipe.file_type
    if ftype in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16) \
            and any(t.native == "MXFP4" for t in tensors):
        ftype = gguf.LlamaFileType.MOSTLY_MXFP4_MOE  # the converter's name for a float file of MXFP4 experts
    out_kv["general.file_type"] = GGUFValue(int(ftype), VT.UINT32)
    if im is not None:
        out_kv.update(imatrix_kv(im))
    return OutputPlan(recipe, path, types, out_kv, infos, weights, force, packed)


def n_dims_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` (numpy order) without leading sizes of 1, as ggml_n_dims counts; at least one."""
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def tensor_weights(tensors: list[PlannedTensor], types: list[type[BlockType]], im: Imatrix) -> list:
    return [im.for_tensor(t.name, t.shape[-1], t.shape[0] if len(t.shape) == 3 else 1) if ty.block > 1 else None
            for t, ty in zip(tensors, types)]


def imatrix_kv(im: Imatrix) -> dict[str, GGUFValue]:
    """The keys llama-quantize adds for --imatrix (as KV overrides: strings cut at 127 bytes)."""
    kv = {"quantize.imatrix.file": GGUFValue(str(im.path)[:127], VT.STRING)}
    if im.datasets:
        kv["quantize.imatrix.dataset"] = GGUFValue(im.datasets[0][:127], VT.STRING)
    kv["quantize.imatrix.entries_count"] = GGUFValue(len(im.entries), VT.UINT32)
    if im.chunk_count > 0:
        kv["quantize.imatrix.chunks_count"] = GGUFValue(im.chunk_count, VT.UINT32)
    return kv


def check_outputs(plan: Plan, force: bool, create: bool) -> None:
    need: dict[Path, int] = {}
    for o in plan.outputs:
        d = o.path.parent
        check_replaceable_file(o.path, force)
        if not create:
            continue
        if not d.is_dir():
            plan.created_dirs += make_dirs(d)
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError(f"{d}: output directory is not writable")
        need[d] = need.get(d, 0) + o.file_size
    for d, n in need.items():
        free = shutil.disk_usage(d).free
        if n > free:
            raise OutputError(f"{d}: not enough disk space: outputs need {n / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
