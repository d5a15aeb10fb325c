"""Copy attention for the tiny T5 (``copy-attention = true``): a pointer-generator.

See, Liu & Manning (2017), "Get To The Point: Summarization with Pointer-Generator Networks"
(https://arxiv.org/abs/1704.04368). A summary of a paper reuses the paper's words; a model
trained from scratch on a few hundred pairs learns to write the words it saw most often
instead. The pointer-generator mixes the decoder's vocabulary distribution with a copy
distribution over the source's tokens, by a learned gate::

    a_t       = mean over heads of the last decoder layer's cross-attention   (over source positions)
    c_t       = sum_i a_t[i] * h_i                     (context: the attended encoder states)
    p_gen     = sigmoid(w . [s_t ; c_t] + b)           (s_t: the decoder state)
    P(w)      = p_gen * softmax(lm_head(s_t))[w] + (1 - p_gen) * sum_{i: x_i = w} a_t[i]

The model returns ``log P`` as its logits: every consumer (cross-entropy, log-softmax for
the feedback algorithms' log-probabilities, sampling, beam search) sees a normalized
distribution, since ``log_softmax(log P) = log P``. The gate is two vectors and a bias,
federated like every other parameter.

Generation runs the encoder once (``_prepare_text_encoder_decoder_kwargs_for_generation``) and
then calls ``forward`` without the source ids: they ride along in the encoder outputs
(``source_ids``), which generation expands for beams and samples as it expands the
encoder's states.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from flhf_core.learning.untied_t5 import UntiedT5ForConditionalGeneration

SOURCE_IDS = "source_ids"  # the key of the source's token ids in the encoder outputs
_FLOOR = 1e-9  # smallest probability: keeps log P finite where neither part gives mass


class CopyT5ForConditionalGeneration(UntiedT5ForConditionalGeneration):
    """The untied tiny T5 with a pointer-generator output (see the module docstring)."""

    def __init__(self, config: T5Config) -> None:
        config._attn_implementation = "eager"  # the only attention that returns its weights
        super().__init__(config)
        self.copy_gate = nn.Linear(2 * config.d_model, 1)
        nn.init.zeros_(self.copy_gate.weight)
        nn.init.zeros_(self.copy_gate.bias)  # p_gen = 0.5 at the start

    def _prepare_text_encoder_decoder_kwargs_for_generation(
        self, inputs_tensor, model_kwargs, *args, **kwargs
    ):
        # transformers 5's hook where generation runs the encoder once (a private method: the
        # copy tests fail loudly if a release renames it)
        model_kwargs = super()._prepare_text_encoder_decoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, *args, **kwargs
        )
        model_kwargs["encoder_outputs"][SOURCE_IDS] = inputs_tensor
        return model_kwargs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        for unsupported in ("inputs_embeds", "decoder_inputs_embeds"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"copy attention needs token ids, not {unsupported}")
            kwargs.pop(unsupported, None)
        kwargs.pop("output_attentions", None)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            source_ids = input_ids
        else:
            source_ids = encoder_outputs.get(SOURCE_IDS) if isinstance(encoder_outputs, dict) else None
            source_ids = input_ids if source_ids is None else source_ids
            if source_ids is None:
                raise ValueError(
                    "copy attention needs the source ids (input_ids or encoder_outputs['source_ids'])"
                )
        encoder_states = encoder_outputs[0]
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            cache=cache,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            output_attentions=True,
            **kwargs,
        )
        states = decoder_outputs[0]
        attention = decoder_outputs.cross_attentions[-1].mean(dim=1)  # (batch, target, source)
        # dropout on the attention weights (training) leaves rows that no longer sum to 1
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(_FLOOR)
        context = attention @ encoder_states
        p_gen = torch.sigmoid(self.copy_gate(torch.cat([states, context], dim=-1)))
        vocabulary = torch.softmax(self.lm_head(states).float(), dim=-1)
        copied = torch.zeros_like(vocabulary).scatter_add_(
            2, source_ids.unsqueeze(1).expand(-1, attention.size(1), -1), attention.float()
        )
        logits = torch.log((p_gen * vocabulary + (1 - p_gen) * copied).clamp_min(_FLOOR))
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(
                logits.flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            encoder_last_hidden_state=encoder_states,
        )
