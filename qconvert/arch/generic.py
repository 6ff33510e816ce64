"""A forward for any decoder that transformers implements, built from transformers' own modules,
one decoder layer at a time, as GPTQModel and llm-compressor run their calibration.

The model's skeleton is built on the meta device (no memory); the model body without its
decoder layers (embeddings, rotary tables, final norm) is built for real and filled from the
memory-mapped checkpoint; its layers are stand-ins that record the arguments each layer is
called with (causal masks, position embeddings: whatever that architecture passes) for every
batch shape the loop runs. Each decoder layer is then built alone, filled from the checkpoint
when it runs and dropped after, and called with those arguments. Every linear layer inside it
(nn.Linear, or GPT-2's Conv1D) offers its input to the layer loop's observers before it runs and
runs on whatever weight they leave (an observer's replacement included).

The hand-written forwards stay where they pay (int8 products in calibration, GGUF evaluation);
tests/arch/test_generic.py shows on the tiny models of every family that this one gives the same
statistics and the same GPTQ and AWQ checkpoints within float noise. Float32 products only.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from qconvert.arch.forward import Forward
from qconvert.errors import InputError

_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


class _Stop(Exception):
    """Raised by the last stand-in layer: the body has given every layer's arguments."""


class _StandIn(torch.nn.Module):
    def __init__(self, i: int, last: bool, record: Callable, returns_tuple: bool, like: torch.nn.Module):
        super().__init__()
        self.i, self.last, self.record, self.returns_tuple = i, last, record, returns_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # what a model's loop reads of its layers
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.record(self.i, hidden_states, args, kwargs)
        if self.last:
            raise _Stop
        return (hidden_states,) if self.returns_tuple else hidden_states


def _batch_slice(value, b: int, full: int):
    """A captured argument for a batch of b samples: tensors (in tuples too) whose first dimension
    is the captured batch's are cut to b; the samples are alike, so any b of them will do."""
    if isinstance(value, torch.Tensor):
        return value[:b] if value.dim() and value.shape[0] == full and full != b else value
    if isinstance(value, tuple):
        return tuple(_batch_slice(v, b, full) for v in value)
    if isinstance(value, dict):
        return {k: _batch_slice(v, b, full) for k, v in value.items()}
    return value


class TransformersForward(Forward):
    PRODUCTS = ("float32",)  # transformers' modules compute the products

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        try:
            import transformers
        except ImportError:
            raise InputError(f"{family.arch_name}: running transformers' modules needs transformers "
                             "(pip install 'qconvert[transformers]')") from None

        path = getattr(family.ckpt, "path", None)
        if path is None or not (path / "config.json").is_file():
            raise InputError(f"{family.arch_name}: transformers' modules need the checkpoint's config.json")
        try:
            config = transformers.AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - transformers' own reading of config.json
            raise InputError(f"{path}: transformers cannot read config.json: {type(e).__name__}: {e}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights come dequantized from `weights`
        config.use_cache = False
        self.config = config
        for impl in ("sdpa", "eager"):  # eager where a model refuses sdpa (Gemma 2's soft-capped scores)
            config._attn_implementation = impl
            try:
                with torch.device("meta"):
                    skeleton = transformers.AutoModelForCausalLM.from_config(config)
                break
            except ValueError:
                if impl == "eager":
                    raise
        lists = [(n, m) for n, m in skeleton.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == family.n_layers]
        if len(lists) != 1:
            raise InputError(f"{path}: cannot tell which of {type(skeleton).__name__}'s modules are its decoder layers")
        self.meta_layers = lists[0][1]
        out_emb = skeleton.get_output_embeddings()
        self.head_name = next((n + ".weight" for n, m in skeleton.named_modules() if m is out_emb), "lm_head.weight")
        self.returns_tuple = int(transformers.__version__.split(".")[0]) < 5  # transformers 4's layers return tuples
        body_config = copy.deepcopy(config)
        body_config.num_hidden_layers = 0
        self.body = transformers.AutoModel.from_config(body_config).eval()
        self.body.config = config  # its loop runs over the layers the full config names
        self.body_prefix = lists[0][0].rsplit(".", 1)[0]  # "model", "transformer", "gpt_neox"
        layers_attr = lists[0][0].rsplit(".", 1)[1]
        self._args: dict[tuple[int, int], dict[int, tuple]] = {}  # (batch, tokens) -> layer -> (args, kwargs)
        self._first: torch.Tensor | None = None
        n = family.n_layers
        setattr(self.body, layers_attr, torch.nn.ModuleList(
            _StandIn(i, i == n - 1, self._record, self.returns_tuple, self.meta_layers[i]) for i in range(n)))
        for name, p in list(self.body.named_parameters()):
            self._assign(self.body, name, self._body_tensor(name, p))
        self._layer: tuple[int, torch.nn.Module] | None = None
        self._block_args: dict[str, tuple] = {}

    # ---- weights -----------------------------------------------------------------------------

    def _body_tensor(self, name: str, p: torch.Tensor) -> torch.Tensor:
        for candidate in (f"{self.body_prefix}.{name}", name):
            if self.has(candidate):
                t = self.w(candidate)
                if tuple(t.shape) != tuple(p.shape):
                    raise InputError(f"{self.family.ckpt.path}: {candidate} has shape {list(t.shape)}, transformers' "
                                     f"{type(self.body).__name__} wants {list(p.shape)}")
                return t
        raise InputError(f"{self.family.ckpt.path}: no tensor {self.body_prefix}.{name} for transformers' "
                         f"{type(self.body).__name__}")

    @staticmethod
    def _assign(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        m = module.get_submodule(owner) if owner else module
        if m._parameters.get(leaf) is not t:
            m._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)

    def linear_weight(self, hf: str) -> torch.Tensor:
        w = self.w(hf + ".weight")
        return w.T if self.family.transposed(hf + ".weight") else w

    def set_linear_weight(self, hf: str, weight: torch.Tensor) -> None:
        super().set_linear_weight(hf, weight.T.contiguous() if self.family.transposed(hf + ".weight") else weight)

    def clear(self) -> None:
        super().clear()
        self._layer = None

    # ---- the layer loop's phases ---------------------------------------------------------------

    def _record(self, i: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if i == 0:
            self._first = hidden
        self._args.setdefault(tuple(hidden.shape[:2]), {})[i] = (args, kwargs)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            self.body(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        h, self._first = self._first, None
        return h

    def _module(self, i: int) -> torch.nn.Module:
        """Decoder layer i, built alone and filled from the checkpoint; its linears observed."""
        if self._layer is not None and self._layer[0] == i:
            return self._layer[1]
        cls = type(self.meta_layers[i])
        try:
            layer = cls(self.config, i)
        except TypeError:
            layer = cls(self.config)
        layer.eval()
        prefix = self.family.layer_prefix(i)
        for name, p in list(layer.named_parameters()):
            t = self.w(prefix + name)
            if tuple(t.shape) != tuple(p.shape):
                raise InputError(f"{self.family.ckpt.path}: {prefix + name} has shape {list(t.shape)}, transformers' "
                                 f"{cls.__name__} wants {list(p.shape)}")
            self._assign(layer, name, t)
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                m.register_forward_pre_hook(self._linear_hook(prefix + name, layer, name))
        for spec in self.family.awq_groups:  # how the layer calls the blocks AWQ's searches compare
            if spec.inspect:
                sub = layer.get_submodule(spec.linears[0].rsplit(".", 1)[0])
                sub.register_forward_pre_hook(self._block_hook(spec.inspect), with_kwargs=True)
        self._layer = (i, layer)
        self._block_args = {}
        return layer

    def _block_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._block_args[name] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, len(x))
        return hook

    def _linear_hook(self, hf: str, layer: torch.nn.Module, name: str):
        def hook(module, args):
            x = self.linear_input(hf, args[0])
            self._assign(layer, name + ".weight", self.w(hf + ".weight"))  # an observer's replacement, if any
            return None if x is args[0] else (x, *args[1:])
        return hook

    def _sync(self, i: int, layer: torch.nn.Module) -> None:
        """Parameters replaced since the layer was built (AWQ's folded norms) go into its modules."""
        prefix = self.family.layer_prefix(i)
        for name, _ in list(layer.named_parameters()):
            self._assign(layer, name, self.w(prefix + name))

    def _call(self, i: int, h: torch.Tensor) -> tuple[tuple, dict]:
        captured = self._args.get(tuple(h.shape[:2]))
        if captured is None or i not in captured:
            raise RuntimeError(f"no call arguments captured for a batch of shape {list(h.shape[:2])}")
        return captured[i]

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        module = self._module(i)
        self._sync(i, module)
        args, kwargs = self._call(i, h)
        out = module(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def block(self, i: int, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """For AWQ: the layer's attention or MLP module, called as the layer called it during its
        run (the arguments were recorded then)."""
        spec = next(s for s in self.family.awq_groups if s.inspect == name)
        module = self._module(i)
        sub = module.get_submodule(spec.linears[0].rsplit(".", 1)[0])
        args, kwargs, full = self._block_args[name]

        def run(x: torch.Tensor) -> torch.Tensor:
            self._sync(i, module)
            out = sub(x, *_batch_slice(args, len(x), full), **_batch_slice(kwargs, len(x), full))
            return out[0] if isinstance(out, tuple) else out
        return run

    def head(self, h: torch.Tensor) -> torch.Tensor:
        norm = next((getattr(self.body, n) for n in _FINAL_NORMS if hasattr(self.body, n)), None)
        if norm is None:
            raise InputError(f"{type(self.body).__name__}: no final norm found")
        h = norm(h)
        # the module's name, or the name checkpoints of it carry (transformers maps GPT-NeoX's
        # embed_out to lm_head when it loads); none: tied to the input embeddings
        name = next((n for n in (self.head_name, "lm_head.weight", "embed_out.weight") if self.has(n)), None)
        w = self.w(name) if name else self.body.get_input_embeddings().weight
        logits = F.linear(h, w)
        if scale := getattr(self.config, "logits_scaling", None):  # Granite's
            logits = logits / scale
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
