"""The one adapter that reads or rewrites a model's activation at a named point.

A hook point is either a Hugging Face module path (`model.layers.15`) or a TransformerLens hook
name (`blocks.8.hook_resid_post`); both resolve to an `nn.Module` (TransformerLens hook points
are identity modules), so one mechanism — a PyTorch forward hook, always removed on exit, even
when the forward raises — serves caching, splice-in evaluation and steering alike.

    with hook_point(model, "model.layers.15", read_fn):         # read:   fn(acts) -> None
        model(ids)
    with hook_point(model, "model.layers.15", edit_fn):         # rewrite: fn(acts) -> new acts
        model(ids)
    with hook_point(model, name, read_fn, stop=True):           # stop the forward after this point
        run_until_stop(model, ids)
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from saekit.errors import HookNotFoundError, nearest

HookFn = Callable[[Tensor], Tensor | None]


class StopForward(Exception):
    """Raised by a stopping hook to end the forward pass after the last hooked point."""


def is_lens_model(model: nn.Module) -> bool:
    return hasattr(model, "hook_dict")


def hook_names(model: nn.Module) -> list[str]:
    """Every valid hook point name of the model."""
    if is_lens_model(model):
        return list(model.hook_dict)
    return [n for n, _ in model.named_modules() if n]


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module behind a hook point name; unknown names list the nearest valid ones."""
    if is_lens_model(model):
        aliases = getattr(model, "hook_aliases", {}) or {}
        module = model.hook_dict.get(aliases.get(name, name))
    else:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
    if module is None:
        raise HookNotFoundError(f"no hook point '{name}' in {type(model).__name__}; "
                                f"nearest valid names: {nearest(name, hook_names(model), n=5)}")
    return module


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def hook_point(model: nn.Module, name: str, fn: HookFn, stop: bool = False) -> Iterator[None]:
    """Install `fn` at `name` for the duration of the block; it sees `[batch, seq, d]` (or `[batch, d]`)."""
    module = resolve(model, name)

    def _hook(_module, _inputs, output):
        new = fn(_first(output))
        if stop:
            raise StopForward(name)
        return None if new is None else _replace_first(output, new)

    handle = module.register_forward_hook(_hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def hook_points(model: nn.Module, fns: dict[str, HookFn], stop_after_last: bool = False) -> Iterator[None]:
    """Several hook points at once; with `stop_after_last`, the forward stops after the deepest one."""
    order = {n: i for i, n in enumerate(hook_names(model))}
    last = max(fns, key=lambda n: order.get(n, -1)) if fns else None
    with contextlib.ExitStack() as stack:
        for n, fn in fns.items():
            stack.enter_context(hook_point(model, n, fn, stop=stop_after_last and n == last))
        yield


def run_until_stop(forward: Callable[[], object]) -> None:
    """Call `forward()`, treating a StopForward from a stopping hook as normal completion."""
    try:
        forward()
    except StopForward:
        pass


@torch.no_grad()
def capture(model: nn.Module, names: list[str], forward: Callable[[], object], stop: bool = True) -> dict[str, Tensor]:
    """Run `forward()` once and return the activations at `names` (forward stops after the last)."""
    got: dict[str, Tensor] = {}
    fns = {n: (lambda t, n=n: got.__setitem__(n, t.detach())) for n in names}
    with hook_points(model, fns, stop_after_last=stop):
        run_until_stop(forward)
    return got


# -- one activation, several names ---------------------------------------------------------------
# Why: an SAE made by another tool names its hook in that tool's convention (TransformerLens
# `blocks.1.hook_resid_post`, dictionary_learning `resid_post_layer_1`, an HF module path
# `model.layers.1`, sparsify `layers.1`); a store names it in the convention of the source that cached
# it. `hook_site` maps each to (layer, site) so the preflight can tell "the same activation, named
# twice" from "another activation".
SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
_LENS = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")
_DICTIONARY_LEARNING = re.compile(r"^(resid_pre|resid_mid|resid_post|mlp_out|attn_out)_layer_(\d+)$")
_MODULE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)(?:\.(mlp|attn|self_attn|attention))?$")
_MODULE_SITE = {None: "resid_post", "mlp": "mlp_out", "attn": "attn_out", "self_attn": "attn_out",
                "attention": "attn_out"}


def hook_site(name: str) -> tuple[int, str] | None:
    """`(layer, site)` of a hook name in TransformerLens, dictionary_learning or HF-module-path style
    (a decoder layer's output is the residual stream after it: `model.layers.1` -> (1, 'resid_post'));
    None when the name follows none of them."""
    if m := _LENS.match(name):
        return int(m.group(1)), m.group(2)
    if m := _DICTIONARY_LEARNING.match(name):
        return int(m.group(2)), m.group(1)
    if m := _MODULE.search(name):
        return int(m.group(1)), _MODULE_SITE[m.group(2)]
    return None
