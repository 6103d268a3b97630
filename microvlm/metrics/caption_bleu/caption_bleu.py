"""Corpus BLEU-4 of captions against one or more references each, by sacrebleu (13a tokenisation)."""

import datasets
import evaluate
import sacrebleu


class CaptionBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus-level BLEU-4 (sacrebleu, 13a tokenisation, exponential smoothing), 0–100.",
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions: list of str; references: list of list of str (any count per prediction)",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        width = max(len(refs) for refs in references)
        # sacrebleu wants one stream per reference slot; pad shorter lists with their first reference.
        streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
        return {"bleu": sacrebleu.corpus_bleu(predictions, streams).score}
