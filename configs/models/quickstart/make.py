"""Write the quickstart model folder: a tiny Llama config and a character-level tokenizer.

Run ``python configs/models/quickstart/make.py`` to regenerate the committed files
(config.json, generation_config.json, tokenizer.json, tokenizer_config.json). No
weights are shipped: the training job starts from a seeded random init.

Why a character-level ``WordLevel`` tokenizer (HF ``tokenizers`` library): it is
built from this script alone (no download), round-trips any printable ASCII text and
gives one token per character, which the quickstart task (reversing a short string,
``recipes/data/make_reverse.py``) needs so that the answer is a token-level reversal.
The model size was chosen by measuring a single-thread training loop on a 2-core CPU
(reported in the README): large enough to learn the task in a few minutes, no larger.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list(string.printable[:95]) + ["\n"]  # letters, digits, punctuation, space; newline
# Zephyr-like turns; {% generation %} marks what the assistant says, so that
# apply_chat_template(return_assistant_tokens_mask=True) finds the loss positions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; BOS is added by the post-processor (as Llama's tokenizer does)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters without the default spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL["max_position_embeddings"],
    )


def main(out: Path = HERE) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaConfig(vocab_size=len(tokenizer), **MODEL, **ids).save_pretrained(out)
    GenerationConfig(**ids, do_sample=False, max_new_tokens=32).save_pretrained(out)


if __name__ == "__main__":
    main()
