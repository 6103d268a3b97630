"""`python -m microvlm.export --model_dir D --output_dir O [--lm_body ternary --embedding int4 ...]` or `--report`."""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..data.collator import episode_step_text, prompt_and_target
from ..modeling_microvlm import MicroVLMForCausalLM
from ..processing_microvlm import MicroVLMProcessor
from .exporter import WeightFormats, write_export
from .vocabulary import coverage, kept_token_ids, trim_embedding, trim_tokenizer


logger = logging.getLogger("microvlm.export")


@dataclass
class ExportArguments:
    model_dir: str | None = field(default=None, metadata={"help": "a saved MicroVLM folder (training form)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to write the packed folder"})
    keep_vocab: int | None = field(default=None, metadata={"help": "keep the N tokens a corpus uses (and specials)"})
    corpus_file: str | None = field(
        default=None,
        metadata={
            "help": "--keep_vocab corpus, one text per line; its last tenth is held out (default: the built-in "
            "shapes set, train split kept from, validation split held out)"
        },
    )
    report: bool = field(default=False, metadata={"help": "print the size table at 'microvlm-v' dims instead"})
    report_dir: str = field(default="outputs/size_report", metadata={"help": "--report: where its folders go"})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExportArguments, WeightFormats))
    args, formats = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.report:
        from .size_report import print_size_report

        print_size_report(args.report_dir, formats)
        return
    if not (args.model_dir and args.output_dir):
        parser.error("give --model_dir and --output_dir (or --report)")
    model = MicroVLMForCausalLM.from_pretrained(args.model_dir).eval()
    processor = MicroVLMProcessor.from_pretrained(args.model_dir)
    if args.keep_vocab:
        processor = trim_vocabulary(model, processor, args.keep_vocab, *corpus(args, model))
    write_export(model, processor, args.output_dir, formats)


def corpus(args: ExportArguments, model: MicroVLMForCausalLM) -> tuple[list[str], list[str]]:
    """(texts to keep tokens from, held-out texts) for `--keep_vocab`."""
    if args.corpus_file:
        lines = [line for line in Path(args.corpus_file).read_text().splitlines() if line.strip()]
        return lines[: len(lines) * 9 // 10], lines[len(lines) * 9 // 10 :]
    from ..data.synthetic_shapes import build_synthetic_dataset

    splits = build_synthetic_dataset(2000, 500, 0, image_size=model.config.vision_config.image_size)
    texts = {name: [text for row in rows for text in sample_texts(row)] for name, rows in splits.items()}
    return texts["train"], texts["validation"]


def sample_texts(sample: dict) -> list[str]:
    """The strings the collator tokenises for a sample: prompt, target (after a space) and episode steps."""
    prompt, target, _ = prompt_and_target(sample)
    steps = [episode_step_text(index, caption) for index, caption in enumerate(sample["episode_captions"])]
    return [text for text in (prompt, (" " if prompt else "") + target, *steps) if text]


def trim_vocabulary(model, processor, keep_vocab: int, texts: list[str], held_out: list[str]) -> MicroVLMProcessor:
    """Trim model and tokenizer to the kept tokens of `texts` (see `vocabulary.py`); logs the held-out coverage."""
    keep_ids = kept_token_ids(processor.tokenizer, texts, keep_vocab)
    tokenizer = trim_tokenizer(processor.tokenizer, keep_ids)
    trim_embedding(model, keep_ids)
    logger.info(
        "vocabulary: %d → %d tokens; held-out texts (%d): %s",
        len(processor.tokenizer),
        len(keep_ids),
        len(held_out),
        coverage(processor.tokenizer, tokenizer, held_out),
    )
    return MicroVLMProcessor(
        processor.image_processor,
        tokenizer,
        image_token=processor.image_token,
        num_image_tokens=processor.num_image_tokens,
        chat_template=processor.chat_template,
    )


if __name__ == "__main__":
    main()
