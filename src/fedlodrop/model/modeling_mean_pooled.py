"""BERT sequence classification over the mean of the token states (sentence-transformers' pooling).

Standalone on purpose: it imports only torch and transformers, because `fedlodrop export` ships
this file inside the exported folder (`auto_map`), so that
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` rebuilds the
model without fedlodrop.

Why it exists: a sentence-transformers checkpoint (such as the packaged all-MiniLM-L6-v2) was
trained through the attention-masked mean of its token states. Its BERT pooler, which
`BertForSequenceClassification` reads as tanh(W_p h_[CLS] + b_p), was never trained (in MiniLM:
bias 0, weight std 0.009), so a classifier put on it starts from a small random projection of a
token the checkpoint never trained. This head reads what the checkpoint was trained to produce:

    pooled = tanh(sum_t m_t h_t / sum_t m_t),   logits = classifier(dropout(pooled))

(m the attention mask; tanh kept so the classifier's input has the range BERT's pooler gives it).
The checkpoint's pooler weights are not used and not loaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each sequence; padding does not move it."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class MeanPooledBertConfig(BertConfig):
    """BERT's config under its own model type. An exported folder carries it, so that transformers
    refuses to load that folder without this file (asking for trust_remote_code=True) instead of
    silently building BERT's [CLS] head, which these weights were not trained with."""

    model_type = "mean_pooled_bert"


class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
    """`BertForSequenceClassification` whose classifier reads tanh(masked mean of the token states)."""

    config_class = MeanPooledBertConfig
    _keys_to_ignore_on_load_unexpected = (r"pooler\.",)  # the checkpoint's [CLS] pooler, unused here

    def __init__(self, config):
        super().__init__(config)
        self.bert.pooler = None  # the [CLS] pooler is not part of this head

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        """Logits from tanh(dense(mean of the token states over the attention mask)); the loss too when labels
        are given (MSE for one label, cross-entropy otherwise)."""
        kwargs.pop("return_dict", None)
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        pooled = torch.tanh(masked_mean(outputs.last_hidden_state, attention_mask))
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss `BertForSequenceClassification` uses for the config's problem type."""
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1)) \
                if self.num_labels == 1 else nn.functional.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


# `save_pretrained` then copies this file into the folder and writes `auto_map` into config.json
MeanPooledBertConfig.register_for_auto_class()
MeanPooledBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
