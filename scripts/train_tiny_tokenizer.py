"""Train the tiny preset's tokenizer (microvlm/assets/tiny_tokenizer): a 2048-token byte-level BPE.

Corpus: the docstrings of a fixed list of Python standard-library modules (English prose that ships with every
Python), plus sentences over the built-in shapes data set's vocabulary (colours, shapes, numbers, positions,
questions), repeated so that each of those words becomes one token. Deterministic for a given Python version
(made with CPython 3.11.7, tokenizers 0.23.3). Special tokens have fixed ids:
0 <|endoftext|> (BOS/EOS/padding), 1 <|im_start|>, 2 <|im_end|>, 3 <image> (the image placeholder).

    python scripts/train_tiny_tokenizer.py [--output microvlm/assets/tiny_tokenizer]
"""

import argparse
import importlib
import inspect
import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
STDLIB_MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "heapq",
    "html",
    "http.client",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "zipfile",
]
COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "pink",
    "brown",
    "grey",
    "gray",
    "cyan",
]
SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
POSITIONS = ["left", "right", "top", "bottom", "centre", "center", "middle"]
# Assistant turns sit in {% generation %} blocks, so `return_assistant_tokens_mask` (TRL's assistant_only_loss)
# finds them.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{%- endmacro -%}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ render(message['content']) }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ render(message['content']) }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    texts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
            if doc:
                texts.append(doc)
    domain = []
    for colour, shape, number, position in itertools.product(COLOURS, SHAPES, NUMBERS[:4], POSITIONS):
        plural = shape + ("es" if shape.endswith(("x", "s")) else "s")
        domain.append(f"{number} {colour} {shape if number == 'one' else plural} on the {position}")
        domain.append(f"what colour are the shapes? {colour}. how many shapes are there? {number}.")
        domain.append(f"what shape is shown? {shape}. where are the shapes? {position}. image {number}:")
        domain.append(f"what colour was the shape in image {NUMBERS.index(number) + 1}? {colour}")
    return texts + domain * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parents[1] / "microvlm/assets/tiny_tokenizer")
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(args.output)
    print(f"wrote a {tokenizer.get_vocab_size()}-token tokenizer to {args.output}")


if __name__ == "__main__":
    main()
