"""TRL's `SFTTrainer` for VisCPM-Chat (`pip install "viscpm-hf[train]"`).

TRL's vision-language collator (`DataCollatorForVisionLanguageModeling`) encodes each batch with
`processor.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)`: the prompt `chat()` asks,
token for token, then the final answer and `</s>`, with `labels` only on those. :class:`VisCPMSFTTrainer` is
`SFTTrainer` with two things set for VisCPM-Chat:

* the loss. SFTTrainer's built-in loss is a fused LM head that needs a backbone returning `last_hidden_state` and a
  plain linear output head; CPM-Bee's head is the tied embedding scaled by 1/sqrt(d) plus per-batch ext-table columns
  (pieces outside the vocabulary), which it cannot express. So `compute_loss` is overridden, as TRL documents for
  custom losses: the model's own loss on TRL's labels, shifted by one (CPM-Bee's `shift_labels` are position-aligned).
* the collator: TRL's collator with `assistant_only_loss=True`. `SFTConfig(assistant_only_loss=True)` cannot ask for
  it: SFTTrainer then looks for `{% generation %}` markers in a Jinja chat template, and VisCPM-Chat lays chats out in
  code (it has no template).
"""

import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

__all__ = ["VisCPMSFTTrainer"]


class VisCPMSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` for VisCPM-Chat: answer-only labels from TRL's vision-language collator, and the loss of
    the model's own head (see the module docstring for why). Takes conversational rows (`messages`) only."""

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("pass the model's processor as processing_class (AutoProcessor.from_pretrained(path))")
        if train_dataset is not None and "messages" not in next(iter(train_dataset)):
            raise ValueError("VisCPMSFTTrainer takes rows with 'messages' (and 'images'): prompt-completion rows are "
                             "encoded by TRL in two separate halves, which CPM-Bee's structured prompt cannot be")
        if args is not None and args.assistant_only_loss:
            args.assistant_only_loss = False  # the collator below masks the prompt (TRL's check needs a template)
        if data_collator is None:
            data_collator = DataCollatorForVisionLanguageModeling(
                processing_class, max_length=None if args is None else args.max_length,
                pad_to_multiple_of=None if args is None else args.pad_to_multiple_of, assistant_only_loss=True)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         processing_class=processing_class, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's labels are input_ids (prompt and padding -100): the target of position p is labels[p + 1].
        labels = inputs.pop("labels")
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        outputs = model(**inputs, shift_labels=targets, num_items_in_batch=num_items_in_batch, use_cache=False)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
