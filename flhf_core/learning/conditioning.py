"""A user's conditioning of the shared model: a soft prompt that only the user's feedback trains.

Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691) steers a frozen model
with a few learned input vectors. P-RLHF (Li et al., 2024, https://arxiv.org/abs/2402.05133)
conditions a shared model on a user embedding made of a generic part, common to everyone,
and a personal offset. Here the generic part is what the shared model already reads: the
embeddings of the first ``P`` tokens of the encoder's input (the request, ``summarize:``,
and the document's first words), trained by federated SFT. The personal part is an offset
``E_u`` of ``P`` vectors of the model's width, added to them, and, as the persona vector of
Li et al. (2016, https://arxiv.org/abs/1603.06155) enters a decoder at every step, one
vector ``v_u`` added to every decoder input embedding::

    e'_i = e_i + E_u[i]        for i < min(P, source length)    (encoder)
    d'_t = d_t + v_u           for every decoding step t          (decoder)

An encoder-side prompt alone barely steers a small encoder-decoder: the decoder sees it only
through cross-attention, and 12 REINFORCE steps moved two users' summary lengths apart by 1.6
words (test_two_users_with_opposite_lengths...); the decoder vector acts on every step.

The sequences keep their lengths, so attention masks, caches and copy attention's source ids
stay as they are. Both parts start at zero: a new user, or one who joins late, is served by
the generic conditioning, exactly the shared model. They are parameters of the client's model
(``user_conditioning.offset``, ``user_conditioning.decoder_offset``), personal like a LoRA
adapter: trained by the user's feedback only, kept on the device, never sent or averaged.
The server's model has none.

Sources are padded on the right (seq2seq tokenizers' default), so the first ``P`` positions
are the request's for every row of a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

MODULE = "user_conditioning"  # the attribute on the model; its parameter is user_conditioning.offset


class UserConditioning(nn.Module):
    """``P`` personal vectors added to the first ``P`` input embeddings of the encoder, and one
    added to every input embedding of the decoder."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(tokens, width))
        self.decoder_offset = nn.Parameter(torch.zeros(width))

    def condition(
        self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The encoder's forward pre-hook: the first ``P`` input embeddings get ``E_u``."""

        def offset_first(embeds: torch.Tensor) -> torch.Tensor:
            n = min(self.offset.size(0), embeds.size(1))
            return torch.cat([embeds[:, :n] + self.offset[:n].to(embeds.dtype), embeds[:, n:]], dim=1)

        return _with_embeddings(encoder, args, kwargs, offset_first)

    def condition_decoder(
        self, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The decoder's forward pre-hook: every input token's embedding gets ``v_u``."""
        return _with_embeddings(decoder, args, kwargs, lambda e: e + self.decoder_offset.to(e.dtype))


def _with_embeddings(
    stack: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    condition: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A stack's call with its input embeddings (given, or those of its token ids) conditioned;
    None (the call as it is) when it has neither."""
    if kwargs.get("inputs_embeds") is not None:
        embeds = kwargs["inputs_embeds"]
    else:
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return None
        embeds = stack.get_input_embeddings()(input_ids)
    return (), {**kwargs, "input_ids": None, "inputs_embeds": condition(embeds), **_positional(args)}


def _positional(args: tuple[Any, ...]) -> dict[str, Any]:
    # every stack this supports (T5's, BART's, BERT) takes input_ids first, then the mask
    if len(args) > 2:
        raise TypeError("a conditioned stack takes its arguments by keyword after the attention mask")
    return {"attention_mask": args[1]} if len(args) == 2 else {}


def add_conditioning(model: PreTrainedModel, tokens: int) -> PreTrainedModel:
    """Give ``model`` a user conditioning of ``tokens`` vectors (zero: the shared model unchanged)."""
    encoder = model.get_encoder()
    width = encoder.get_input_embeddings().embedding_dim
    conditioning = UserConditioning(tokens, width).to(encoder.get_input_embeddings().weight.device)
    setattr(model, MODULE, conditioning)
    # bound methods of a submodule: copy.deepcopy(model) rebinds them to the copy's conditioning
    encoder.register_forward_pre_hook(conditioning.condition, with_kwargs=True)
    model.get_decoder().register_forward_pre_hook(conditioning.condition_decoder, with_kwargs=True)
    return model


def strip_conditioning(stack: nn.Module) -> nn.Module:
    """``stack`` without a user conditioning's hooks: a copy of a conditioned encoder (a reward
    model's) would otherwise carry a frozen copy of the user's conditioning along."""
    for handle, hook in list(stack._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), UserConditioning):
            del stack._forward_pre_hooks[handle]
            stack._forward_pre_hooks_with_kwargs.pop(handle, None)
    return stack
