"""Kohya/LyCORIS module names <-> module paths, written as data (prefix tables, path-style rules, token lists) that one
small engine runs in both directions.

A kohya module name is ``prefix + path.replace(".", "_")`` where ``path`` is the module's dotted path inside one model
component, possibly in another *style* than the model's own (SGM block names for a diffusers UNet, a missing
``text_model`` level for CLIP). Underscores cannot be turned back into dots by string replacement, so names are
resolved either from a table built from the target model's ``named_modules()`` (exact, used whenever a model is at
hand) or, without a model, by re-assembling known multi-underscore tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from torch import nn

from ..tuners.targets import adaptable_layers, unwrap


# ---------------------------------------------------------------------------------------------------------- keys
def split_key(key: str, params: Iterable[str]) -> tuple[str, str] | None:
    """Split a file key into ``(module name, parameter)``; ``None`` if it ends in no known parameter name.

    Kohya names contain no dots, so the first dot separates module and parameter; dotted (PEFT/ComfyUI style)
    names are split at the longest known parameter suffix.
    """
    for param in sorted(params, key=len, reverse=True):
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    return None


def flatten(path: str) -> str:
    """The kohya form of a dotted module path."""
    return path.replace(".", "_")


def unflatten(body: str, tokens: frozenset[str]) -> str:
    """Re-insert the dots of a flattened path, keeping known multi-underscore tokens (``transformer_blocks``) whole.

    Longest token first; anything unknown is split at every underscore.
    """
    parts = body.split("_")
    longest = max((token.count("_") + 1 for token in tokens), default=1)
    out = []
    i = 0
    while i < len(parts):
        for j in range(min(len(parts), i + longest), i, -1):
            candidate = "_".join(parts[i:j])
            if j == i + 1 or candidate in tokens:
                out.append(candidate)
                i = j
                break
    return ".".join(out)


# -------------------------------------------------------------------------------------------------- path styles
class PathStyle(Protocol):
    """A way of writing a component's module paths: ``to_style`` from the canonical path, ``from_style`` back.

    ``from_style`` returns ``None`` when the path is not written in this style.
    """

    name: str

    def to_style(self, path: str) -> str | None: ...

    def from_style(self, path: str) -> str | None: ...


@dataclass(frozen=True)
class IdentityStyle:
    """Paths written exactly as the canonical module paths."""

    name: str

    def to_style(self, path: str) -> str | None:
        return path

    def from_style(self, path: str) -> str | None:
        return path


@dataclass(frozen=True)
class RewriteStyle:
    """A style that differs from the canonical paths by regex rewrites (first matching rule wins).

    ``to_style`` leaves paths no rule matches unchanged; ``from_style`` returns ``None`` for them, so a path only counts
    as written in this style when its marker is present.
    """

    name: str
    forward: tuple[tuple[str, str], ...]
    backward: tuple[tuple[str, str], ...]

    def to_style(self, path: str) -> str | None:
        return _rewrite(path, self.forward) or path

    def from_style(self, path: str) -> str | None:
        return _rewrite(path, self.backward)


def _rewrite(path: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, path, count=1)
        if count:
            return new
    return None


@dataclass(frozen=True)
class BlockRule:
    """One family of UNet blocks in the diffusers and SGM layouts.

    Templates use ``{b}`` (diffusers block), ``{j}`` (index inside the block) and ``{n}`` (SGM block); the SGM index is
    ``n = offset + (L + 1) * b + j`` with ``L = layers_per_block`` and ``j < slots``. ``leaves`` renames the module
    inside the block (diffusers name, SGM name).
    """

    diffusers: str
    sgm: str
    offset: int = 0
    slots: int = 1
    leaves: tuple[tuple[str, str], ...] = ()


@cache
def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("b", "j", "n"):
        pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
    return re.compile(pattern + r"(?=\.|$)")


@dataclass(frozen=True)
class BlockStyle:
    """UNet paths in the original Stability (SGM) layout, converted block by block with ``BlockRule`` index rules."""

    name: str
    rules: tuple[BlockRule, ...]
    layers_per_block: int

    def to_style(self, path: str) -> str | None:
        return self._convert(path, to_sgm=True)

    def from_style(self, path: str) -> str | None:
        return self._convert(path, to_sgm=False)

    def _convert(self, path: str, to_sgm: bool) -> str | None:
        width = self.layers_per_block + 1
        for rule in self.rules:
            source, target = (rule.diffusers, rule.sgm) if to_sgm else (rule.sgm, rule.diffusers)
            match = _template_regex(source).match(path)
            if not match:
                continue
            fields = {name: int(value) for name, value in match.groupdict().items()}
            if to_sgm:
                b, j = fields.get("b", 0), fields.get("j", 0)
                if j >= rule.slots:
                    continue
                head = target.format(n=rule.offset + width * b + j)
            else:
                b, j = divmod(fields["n"] - rule.offset, width) if "n" in fields else (0, 0)
                if b < 0 or j >= rule.slots or ("{b}" not in target and b) or ("{j}" not in target and j):
                    continue
                head = target.format(b=b, j=j)
            leaf = path[match.end() + 1 :]
            renames = {src: dst for src, dst in ((d, s) if to_sgm else (s, d) for d, s in rule.leaves)}
            leaf = renames.get(leaf, leaf)
            return f"{head}.{leaf}" if leaf else head
        return None


_RESNET_LEAVES = (("conv1", "in_layers.2"), ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                  ("conv_shortcut", "skip_connection"))  # fmt: skip


def sdxl_unet_block_rules(layers_per_block: int = 2) -> tuple[BlockRule, ...]:
    """SGM <-> diffusers block table for an SDXL-type UNet; the index rules depend on ``L``."""
    L = layers_per_block
    return (
        BlockRule("conv_in", "input_blocks.0.0"),
        BlockRule("conv_out", "out.2"),
        BlockRule("time_embedding.linear_1", "time_embed.0"),
        BlockRule("time_embedding.linear_2", "time_embed.2"),
        BlockRule("add_embedding.linear_1", "label_emb.0.0"),
        BlockRule("add_embedding.linear_2", "label_emb.0.2"),
        BlockRule("down_blocks.{b}.downsamplers.0.conv", "input_blocks.{n}.0.op", offset=L + 1),
        BlockRule("down_blocks.{b}.resnets.{j}", "input_blocks.{n}.0", offset=1, slots=L, leaves=_RESNET_LEAVES),
        BlockRule("down_blocks.{b}.attentions.{j}", "input_blocks.{n}.1", offset=1, slots=L),
        BlockRule("mid_block.resnets.0", "middle_block.0", leaves=_RESNET_LEAVES),
        BlockRule("mid_block.attentions.0", "middle_block.1"),
        BlockRule("mid_block.resnets.1", "middle_block.2", leaves=_RESNET_LEAVES),
        # the upsampler sits at inner index 2 because every SDXL up block with an upsampler also has attentions
        BlockRule("up_blocks.{b}.upsamplers.0.conv", "output_blocks.{n}.2.conv", offset=L),
        BlockRule("up_blocks.{b}.resnets.{j}", "output_blocks.{n}.0", slots=L + 1, leaves=_RESNET_LEAVES),
        BlockRule("up_blocks.{b}.attentions.{j}", "output_blocks.{n}.1", slots=L + 1),
    )


# CLIP: transformers 5 drops the `text_model` level of CLIPTextModel; files are written with and without it.
_CLIP_TEXT_MODEL_PARTS = r"^(encoder|embeddings|final_layer_norm)(?=\.|$)"
CLIP_WITH_TEXT_MODEL = RewriteStyle(
    "text_model", forward=((_CLIP_TEXT_MODEL_PARTS, r"text_model.\1"),), backward=((r"^text_model\.", ""),)
)
CLIP_PLAIN = IdentityStyle("plain")


# ------------------------------------------------------------------------------------------- component schemes
@dataclass(frozen=True)
class ComponentNames:
    """How the modules of one model component (``unet``, ``text_encoder``, ...) are named in files.

    ``styles`` are tried in order when reading; ``write_style`` maps the writer's ``naming`` choice to a style.
    ``tokens`` are the multi-underscore names used to parse flat names without a model; ``kernel_hints`` give the
    kernel of convolutions (by canonical path regex) when no model is at hand; ``layout`` names the style of the
    default model's own paths (a callable, because it can depend on the installed transformers); ``attributes`` are
    the pipeline attributes that may hold the component (default: its name).
    """

    name: str
    write_prefix: str
    read_prefixes: tuple[str, ...]
    dotted_prefixes: tuple[str, ...]
    styles: Callable[[nn.Module | None], tuple[PathStyle, ...]]
    write_style: Mapping[str, str]
    tokens: frozenset[str]
    layout: Callable[[], str]
    kernel_hints: tuple[tuple[str, tuple[int, ...]], ...] = ()
    attributes: tuple[str, ...] = ()
    # naming="comfy": ComfyUI's own dotted prefix (module names stay dotted); None writes kohya names in the
    # write_style "comfy" maps to
    comfy_prefix: str | None = None


@dataclass(frozen=True)
class ModelNames:
    """Naming scheme of one model family: its components and how to recognise its files."""

    model_type: str
    components: tuple[ComponentNames, ...]
    detect: str
    base_model_version: str

    def component(self, name: str) -> ComponentNames:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"{self.model_type} has no component {name!r}; components: {[c.name for c in self.components]}")


def _unet_styles(unet: nn.Module | None) -> tuple[PathStyle, ...]:
    layers = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    return (BlockStyle("sgm", sdxl_unet_block_rules(layers), layers), IdentityStyle("diffusers"))


def _clip_styles(_: nn.Module | None) -> tuple[PathStyle, ...]:
    return (CLIP_WITH_TEXT_MODEL, CLIP_PLAIN)


def _identity_styles(_: nn.Module | None) -> tuple[PathStyle, ...]:
    return (IdentityStyle("identity"),)


@cache
def _clip_layout(class_name: str) -> str:
    """``"text_model"`` if the installed transformers ``class_name`` keeps the ``text_model`` level, else ``"plain"``."""
    import torch
    import transformers

    config = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    with torch.device("meta"):
        model = getattr(transformers, class_name)(config)
    return "text_model" if hasattr(model, "text_model") else "plain"


_UNET_TOKENS = frozenset(
    [
        "conv_in",
        "conv_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "down_blocks",
        "up_blocks",
        "mid_block",
        "conv_shortcut",
        "time_emb_proj",
        "proj_in",
        "proj_out",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
    ]
)
_CLIP_TOKENS = frozenset(
    ["text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "final_layer_norm"]
)
_ANIMA_DIT_TOKENS = frozenset(
    [
        "llm_adapter",
        "self_attn",
        "cross_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "output_proj",
        "out_proj",
        "in_proj",
        "x_embedder",
        "t_embedder",
        "linear_1",
        "linear_2",
        "final_layer",
        "adaln_modulation",
        "adaln_modulation_self_attn",
        "adaln_modulation_cross_attn",
        "adaln_modulation_mlp",
    ]
)
_QWEN3_TOKENS = frozenset(["self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

SDXL = ModelNames(
    model_type="sdxl",
    components=(
        ComponentNames(
            name="unet",
            write_prefix="lora_unet_",
            read_prefixes=("lora_unet_", "lycoris_"),
            dotted_prefixes=("unet.", "diffusion_model.", "model.diffusion_model."),
            styles=_unet_styles,
            write_style={"sgm": "sgm", "diffusers": "diffusers", "comfy": "sgm"},  # ComfyUI reads SGM names
            tokens=_UNET_TOKENS,
            layout=lambda: "diffusers",
            kernel_hints=(
                (r"(^|\.)(conv_in|conv_out|conv1|conv2|downsamplers\.0\.conv|upsamplers\.0\.conv)$", (3, 3)),
                (r"(^|\.)conv_shortcut$", (1, 1)),
            ),
        ),
        ComponentNames(
            name="text_encoder",
            write_prefix="lora_te1_",
            read_prefixes=("lora_te1_", "lora_te_"),
            dotted_prefixes=("text_encoder.", "text_encoders.clip_l.transformer."),
            styles=_clip_styles,
            write_style={"sgm": "text_model", "diffusers": "text_model", "comfy": "text_model"},
            tokens=_CLIP_TOKENS,
            layout=lambda: _clip_layout("CLIPTextModel"),
        ),
        ComponentNames(
            name="text_encoder_2",
            write_prefix="lora_te2_",
            read_prefixes=("lora_te2_",),
            dotted_prefixes=("text_encoder_2.", "text_encoders.clip_g.transformer."),
            styles=_clip_styles,
            write_style={"sgm": "text_model", "diffusers": "text_model", "comfy": "text_model"},
            tokens=_CLIP_TOKENS,
            layout=lambda: _clip_layout("CLIPTextModelWithProjection"),
        ),
    ),
    detect=r"^(lora_te[12]_|lora_unet_(input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks|conv_in|"
    r"conv_out|time_embed|label_emb|add_embedding)|lycoris_(down_blocks|mid_block|up_blocks|conv_in|conv_out|"
    r"time_embedding|add_embedding)|(unet|text_encoder|text_encoder_2)\.)",
    base_model_version="sdxl_base_v1-0",
)

ANIMA = ModelNames(
    model_type="anima",
    components=(
        ComponentNames(
            name="transformer",
            write_prefix="lora_unet_",
            read_prefixes=("lora_unet_", "lycoris_"),
            dotted_prefixes=("transformer.", "diffusion_model.", "net."),
            styles=_identity_styles,
            write_style={"sgm": "identity", "diffusers": "identity", "comfy": "identity"},
            tokens=_ANIMA_DIT_TOKENS,
            layout=lambda: "identity",
            attributes=("transformer", "dit"),  # peft_lyco.models.anima.AnimaPipeline keeps it as .dit
            comfy_prefix="diffusion_model.",
        ),
        ComponentNames(
            name="text_encoder",
            write_prefix="lora_te_",
            read_prefixes=("lora_te_",),
            dotted_prefixes=("text_encoder.", "text_encoders.qwen3_06b.transformer.model."),
            styles=_identity_styles,
            write_style={"sgm": "identity", "diffusers": "identity", "comfy": "identity"},
            tokens=_QWEN3_TOKENS,
            layout=lambda: "identity",
            comfy_prefix="text_encoders.qwen3_06b.transformer.model.",
        ),
    ),
    detect=r"^(lora_unet_(blocks|llm_adapter|x_embedder|t_embedder|final_layer)_|lora_te_layers_|"
    r"lycoris_(blocks|llm_adapter)_|(transformer|text_encoders\.qwen3_06b)\.)",
    base_model_version="anima",
)

MODEL_NAMES = {scheme.model_type: scheme for scheme in (SDXL, ANIMA)}


def model_names(model_type: str) -> ModelNames:
    """The naming scheme of ``model_type`` (``"sdxl"`` or ``"anima"``)."""
    try:
        return MODEL_NAMES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_NAMES)}") from None


_METADATA_TYPES = (("ss_base_model_version", r"^sdxl", "sdxl"), ("ss_base_model_version", r"^anima", "anima"),
                   ("modelspec.architecture", r"^stable-diffusion-xl", "sdxl"),
                   ("modelspec.architecture", r"^anima", "anima"))  # fmt: skip


def foreign_family_tags(metadata: Mapping[str, str] | None, model_type: str) -> list[str]:
    """``key=value`` of every model-family tag in ``metadata`` (``ss_base_model_version``, ``modelspec.architecture``)
    that does not name ``model_type``: an SD1.5/SD3/Flux file whose module names happen to fit loads, but wrongly."""
    foreign = []
    for key in dict.fromkeys(key for key, _, _ in _METADATA_TYPES):
        value = str((metadata or {}).get(key, "")).strip()
        if not value:
            continue
        families = {found for k, pattern, found in _METADATA_TYPES if k == key and re.match(pattern, value)}
        if model_type not in families:
            foreign.append(f"{key}={value!r}")
    return foreign


def detect_model_type(module_names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """Tell SDXL from Anima files by their metadata, else by their module names; raise if it stays ambiguous."""
    for key, pattern, model_type in _METADATA_TYPES:
        if re.match(pattern, str((metadata or {}).get(key, ""))):
            return model_type
    names = list(module_names)
    found = sorted({s.model_type for s in MODEL_NAMES.values() for name in names if re.match(s.detect, name)})
    if len(found) == 1:
        return found[0]
    reason = f"names of both {found}" if found else "no module name of a known model"
    raise ValueError(
        f"cannot tell which model this file is for ({reason}; e.g. {names[:3]}); pass model_type= one of "
        f"{sorted(MODEL_NAMES)}"
    )


# Denoiser classes a bare model is recognised by, and the component they are.
DENOISER_CLASSES = {"UNet2DConditionModel": "unet", "AnimaDiT": "transformer"}


def model_type_of(components: object) -> str:
    """The model family of models in hand: ``"sdxl"`` or ``"anima"``.

    ``components`` is a pipeline (SDXL: ``unet`` and ``text_encoder_2``; Anima: ``transformer`` or ``dit``), a mapping
    of component names to models, or one denoiser model (``UNet2DConditionModel``, ``AnimaDiT``, or a ``PeftModel`` of
    one). Raises a ``ValueError`` saying what was found otherwise.
    """
    if isinstance(components, Mapping):
        names = set(components)
    elif isinstance(components, nn.Module):
        names = {DENOISER_CLASSES.get(type(unwrap(components)).__name__)}
    else:
        names = {name for name in ("transformer", "dit") if isinstance(getattr(components, name, None), nn.Module)}
        if isinstance(getattr(components, "unet", None), nn.Module) and hasattr(components, "text_encoder_2"):
            names.add("unet")
    if "unet" in names:
        return "sdxl"
    if names & {"transformer", "dit"}:
        return "anima"
    raise ValueError(
        f"{type(components).__name__} is neither an SDXL pipeline (unet + text_encoder_2) nor an Anima pipeline "
        "(transformer or dit), nor a mapping or denoiser model of either; pass model_type='sdxl' or 'anima' where "
        "the function takes one"
    )


# ------------------------------------------------------------------------------------------------ model tables
class NameResolver:
    """Resolves file module names to ``(component, module path)`` and writes kohya names, for one model family.

    With ``models`` (component name -> model), names are looked up in tables built from each model's adaptable
    modules in every style, so they are exact and any module layout works. Without a model, flat names are parsed with
    the scheme's tokens and style rules into the default model layout.
    """

    def __init__(self, scheme: ModelNames, models: Mapping[str, nn.Module] | None = None):
        self.scheme = scheme
        self.models = dict(models or {})
        self._tables: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self._layers: dict[str, dict[str, nn.Module]] = {}

    def layers(self, component: str) -> dict[str, nn.Module]:
        """Path -> adaptable layer of a component's model (empty without a model), computed once."""
        if component not in self._layers:
            model = self.models.get(component)
            self._layers[component] = dict(adaptable_layers(model)) if model is not None else {}
        return self._layers[component]

    def styles(self, component: ComponentNames) -> tuple[PathStyle, ...]:
        return component.styles(self.models.get(component.name))

    def canonical(self, component: ComponentNames, path: str) -> str | None:
        """A path in any of the component's styles, written in the canonical style (diffusers UNet, plain CLIP)."""
        for style in self.styles(component):
            canonical = style.from_style(path)
            if canonical is not None:
                return canonical
        return None

    def _table(self, component: ComponentNames) -> tuple[dict[str, str], dict[str, str]]:
        """(flat name -> path, styled dotted path -> path) for every adaptable module of the component's model."""
        if component.name not in self._tables:
            flat, dotted = {}, {}
            for path in self.layers(component.name):
                canonical = self.canonical(component, path)
                for style in self.styles(component):
                    styled = style.to_style(canonical) if canonical is not None else None
                    for variant in {path, styled} - {None}:
                        flat.setdefault(flatten(variant), path)
                        dotted.setdefault(variant, path)
            self._tables[component.name] = (flat, dotted)
        return self._tables[component.name]

    def resolve(self, module_name: str) -> tuple[str, str] | None:
        """``(component, path)`` of a file module name, or ``None`` if it names no module of this model family."""
        for component in self.scheme.components:
            for prefix in component.dotted_prefixes:
                if module_name.startswith(prefix):
                    return self._lookup(component, module_name[len(prefix) :], dotted=True)
        candidates = [(prefix, component) for component in self.scheme.components for prefix in component.read_prefixes]
        for prefix, component in sorted(candidates, key=lambda item: -len(item[0])):
            if module_name.startswith(prefix):
                return self._lookup(component, module_name[len(prefix) :], dotted=False)
        return None

    def _lookup(self, component: ComponentNames, body: str, dotted: bool) -> tuple[str, str] | None:
        if component.name in self.models:
            flat, paths = self._table(component)
            path = paths.get(body) if dotted else flat.get(body)
        else:
            styled = body if dotted else unflatten(body, component.tokens)
            canonical = self.canonical(component, styled)
            layout = {style.name: style for style in self.styles(component)}[component.layout()]
            path = layout.to_style(canonical) if canonical is not None else None
        return (component.name, path) if path else None

    def kohya_name(self, component_name: str, path: str, naming: str = "sgm") -> str:
        """The module name the writer uses for module ``path`` of a component.

        ``naming``: ``"sgm"`` or ``"diffusers"`` (kohya names, the UNet in that layout), or ``"comfy"``: what ComfyUI
        reads, i.e. SGM kohya names for SDXL and ComfyUI's dotted names for Anima (``diffusion_model.<DiT path>``,
        ``text_encoders.qwen3_06b.transformer.model.<Qwen3 path>``)."""
        component = self.scheme.component(component_name)
        if naming not in component.write_style:
            raise ValueError(f"naming must be one of {sorted(component.write_style)}, got {naming!r}")
        styles = {style.name: style for style in self.styles(component)}
        canonical = self.canonical(component, path)
        styled = styles[component.write_style[naming]].to_style(canonical) if canonical is not None else None
        if styled is None:
            raise ValueError(f"{component_name} module '{path}' has no {naming} name")
        if naming == "comfy" and component.comfy_prefix is not None:
            return component.comfy_prefix + styled
        return component.write_prefix + flatten(styled)

    def kernel_hint(self, component_name: str, path: str) -> tuple[int, ...] | None:
        """The kernel of a convolution at ``path`` from the scheme's hints (used only when no model is given)."""
        for pattern, kernel in self.scheme.component(component_name).kernel_hints:
            if re.search(pattern, path):
                return kernel
        return None
