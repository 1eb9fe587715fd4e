"""Train a small byte-level BPE tokenizer offline and save it in Hugging Face format: with
DeepSeek-V3's special tokens and a chat template in its style, or with GPT-OSS's (harmony)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pdserve.cluster import harmony

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

_WORDS = """
the of and to in is was that for on are with as be at by this had not but from or have an they
which one you were all we her she there would their will when who him been has more if no out do
so can what up said about other into than its time only could new them man some these then two
first may any like now my such make over our even most me state after also made many did must
before back see through way where get much go well your know should down work year because come
people just say each those take day good how long very high find here thing give great tell
small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
show large often together asked house world going want school important until form food keep
children feet land side without boy once animal life enough took four head above kind began
almost live page got earth need far hand high year mother light country father let night picture
being study second soon story since white ever paper hard near sentence better best across during
today however sure knew try told young sun thing whole hear example heard several change answer
room sea against top turned learn point city play toward five himself usually money seen car
morning body upon family later turn move face door cut done group true leave color red friend
model token cache block prefill decode expert router latent attention layer weight kernel batch
request stream server cluster replica queue memory tensor matrix vector scale sample engine
""".split()

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "if x > 0 and y < 0:\n    z = x - y\nelse:\n    z = 0\n",
    "class Block:\n    def __init__(self, size):\n        self.size = size\n",
    '{"model": "tiny", "max_tokens": 16, "temperature": 0.0}\n',
]


def corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic text: sentences over a word list, numbers, code and punctuation."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(n), str(rng.randint(0, 10_000)))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ",", ";", ":"])
        lines.append(sentence)
        if i % 50 == 0:
            lines.append(rng.choice(_CODE))
    lines.append("Ünïcödé: 数据 データ данные 🙂 — “quotes” ‘single’ … ½ ¿?")
    return lines


STYLES = ("deepseek", "harmony")


def train_tokenizer(
    out: str | Path, vocab_size: int = 2048, max_length: int = 2048, style: str = "deepseek"
) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``out``; returns the vocabulary size.

    ``style="deepseek"``: ``SPECIAL_TOKENS`` get ids 0..3, BOS is added to every encoding, EOS
    ends a reply. ``style="harmony"``: ``harmony.SPECIAL_TOKENS`` get ids 0..8 in their order
    (``<|return|>`` 7 and ``<|call|>`` 8 end a reply), no BOS is added, eos ``<|return|>``, pad
    ``<|endoftext|>``, and ``harmony.CHAT_TEMPLATE``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose from {list(STYLES)}")
    specials = SPECIAL_TOKENS if style == "deepseek" else harmony.SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if style == "deepseek":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if style == "deepseek":
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "add_bos_token": True,
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
    else:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": harmony.STARTOFTEXT,
            "eos_token": harmony.RETURN,
            "pad_token": harmony.ENDOFTEXT,
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": harmony.CHAT_TEMPLATE,
        }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return tok.get_vocab_size()
