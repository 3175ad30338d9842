"""Strategies that differ only in which parameters train: scratch, linear, full, top_k, layers_k, surgical."""

from __future__ import annotations

from medtune.errors import ConfigError
from medtune.strategies._registry import register_strategy
from medtune.strategies.base import Strategy, check_int_param, freeze_all, set_blocks_trainable

__all__ = ["Scratch", "Linear", "Full", "TopK", "LayersK", "Surgical"]


@register_strategy("full")
class Full(Strategy):
    """Fine-tune every parameter from the pretrained weights with one LR."""

    def depth(self, num_blocks: int) -> int:
        return num_blocks - 1


@register_strategy("scratch")
class Scratch(Full):
    """Train every parameter of the same architecture from random initialisation (Tajbakhsh baseline)."""

    pretrained = False


@register_strategy("linear")
class Linear(Strategy):
    """Linear probe: only the head trains; the backbone is frozen."""

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        set_blocks_trainable(blocks, [blocks.head_idx])

    def depth(self, num_blocks: int) -> int:
        return 0


@register_strategy("top_k")
class TopK(Strategy):
    """Fine-tune the top ``k`` blocks and the head (Kandel & Castelli 2020); ``k=0`` is the head only.

    With blocks ``stem, stage_1..stage_S, head``, k ranges over 0 … S+1 (S+1 = every block).
    """

    main_param = "k"
    defaults = {"k": 1}

    def validate(self) -> None:
        check_int_param(self, "k")

    def check_blocks(self, blocks) -> None:
        max_k = len(blocks) - 1
        if self.params["k"] > max_k:
            names = ", ".join(b.name for b in blocks)
            unit = "blocks" if self.granularity == "block" else "layers"
            raise ConfigError(
                f"{self.name} k={self.params['k']} is out of range for this model, which has {len(blocks)} "
                f"{unit} ({names if len(blocks) <= 12 else names[:120] + ', ...'}); use k in 0..{max_k}."
            )

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[int]:
        return list(range(num_units))

    def set_trainable(self, blocks) -> None:
        self.check_blocks(blocks)
        freeze_all(blocks)
        head = blocks.head_idx
        set_blocks_trainable(blocks, range(head - self.params["k"], head + 1))

    def depth(self, num_blocks: int) -> int:
        return int(self.params["k"])


@register_strategy("layers_k")
class LayersK(TopK):
    """Fine-tune the top ``k`` layers and the head (Tajbakhsh et al. 2016: k grows from the last layer down)."""

    granularity = "layer"


@register_strategy("surgical")
class Surgical(Strategy):
    """Fine-tune one block (and the head) only (Lee et al. 2023, surgical fine-tuning).

    ``block`` is a block index (0 = stem) or a block name such as ``stage_2``.
    """

    main_param = "block"
    defaults = {"block": 0}

    def validate(self) -> None:
        block = self.params["block"]
        if isinstance(block, bool) or not isinstance(block, (int, str)) or (isinstance(block, int) and block < 0):
            raise ConfigError(
                f"The 'block' parameter of strategy 'surgical' must be a block index >= 0 or a block name. Got {block!r}."
            )

    def _index(self, blocks) -> int:
        block = self.params["block"]
        names = [b.name for b in blocks]
        if isinstance(block, str):
            if block not in names:
                raise ConfigError(f"surgical block {block!r} is not a block of this model; blocks: {', '.join(names)}.")
            return names.index(block)
        if block >= blocks.head_idx:
            raise ConfigError(
                f"surgical block={block} is out of range: this model has {len(blocks) - 1} non-head blocks "
                f"({', '.join(names[:-1])}); use 0..{blocks.head_idx - 1}."
            )
        return block

    def check_blocks(self, blocks) -> None:
        self._index(blocks)

    @classmethod
    def expand(cls, value: str, num_units: int) -> list[int]:
        return list(range(num_units - 1))

    def set_trainable(self, blocks) -> None:
        freeze_all(blocks)
        set_blocks_trainable(blocks, [self._index(blocks), blocks.head_idx])


@register_strategy("deft")
class MaskStrategy(Strategy):
    """Fine-tune the blocks (or layers) a DEFT mask selects, plus the head (Vrbančič & Podgorelec 2020).

    ``mask`` is a string of 0/1, one per non-head unit from input to output (``deft:0011``);
    ``granularity`` is ``block`` or ``layer``.
    """

    main_param = "mask"
    defaults = {"mask": "", "granularity": "block"}

    def validate(self) -> None:
        mask, gran = self.params["mask"], self.params["granularity"]
        if not isinstance(mask, str) or not mask or set(mask) - {"0", "1"}:
            raise ConfigError(f"The 'mask' parameter of strategy 'deft' must be a string of 0/1 (one per non-head "
                              f"block, input to output), e.g. 'deft:00111'. Got {mask!r}.")
        if gran not in ("block", "layer"):
            raise ConfigError(f"The 'granularity' parameter of strategy 'deft' must be block or layer. Got {gran!r}.")
        self.granularity = gran

    def check_blocks(self, blocks) -> None:
        if len(self.params["mask"]) != blocks.head_idx:
            raise ConfigError(f"deft mask {self.params['mask']!r} has {len(self.params['mask'])} bits but this model "
                              f"has {blocks.head_idx} non-head {self.granularity}s; give one bit per {self.granularity}.")

    def set_trainable(self, blocks) -> None:
        self.check_blocks(blocks)
        freeze_all(blocks)
        set_blocks_trainable(blocks, [i for i, bit in enumerate(self.params["mask"]) if bit == "1"] + [blocks.head_idx])

    def depth(self, num_blocks: int) -> int:
        return self.params["mask"].count("1")
