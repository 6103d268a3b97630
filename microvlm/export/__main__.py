"""`python -m microvlm.export --model_dir D --output_dir O [--lm_body ternary --embedding int4 ...]` or `--report`."""

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..modeling_microvlm import MicroVLMForCausalLM
from ..processing_microvlm import MicroVLMProcessor
from .exporter import WeightFormats, write_export

logger = logging.getLogger("microvlm.export")


@dataclass
class ExportArguments:
    model_dir: str | None = field(default=None, metadata={"help": "a saved MicroVLM folder (training form)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to write the packed folder"})
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
    write_export(model, MicroVLMProcessor.from_pretrained(args.model_dir), args.output_dir, formats)


if __name__ == "__main__":
    main()
