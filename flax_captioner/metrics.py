"""Caption metrics: BLEU-4, ROUGE-L and CIDEr (pycocoevalcap's scorers) and exact match.

pycocoevalcap is the COCO caption evaluation code that captioning papers report, and the
only maintained implementation of CIDEr-D. Its scorers are pure Python; its PTB tokenizer
shells out to Java, so captions are normalised here instead (lower case, punctuation
dropped, whitespace split), which is what that tokenizer does to plain English captions.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

from flax_captioner.errors import CaptionerError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_caption(caption: str) -> str:
    """Lower case, punctuation removed, single spaces.

    ``"A Cat, sleeping." -> "a cat sleeping"``
    """
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def caption_scores(predictions: Mapping[str, str],
                   references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr-D of one prediction per image against its references.

    Args:
      predictions: image key -> generated caption.
      references: image key -> its reference captions (one or more); same keys.

    Returns:
      ``{"bleu4", "rougeL", "cider"}``, each a float (BLEU and ROUGE in [0, 1]; CIDEr-D is
      10x a mean cosine similarity, so up to about 10).
    """
    require_scorers()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same image keys")
    if not predictions:
        raise ValueError("no predictions to score")
    results = {key: [normalize_caption(predictions[key])] for key in predictions}
    gold = {key: [normalize_caption(caption) for caption in references[key]]
            for key in predictions}
    bleu, _ = Bleu(4).compute_score(gold, results, verbose=0)
    rouge, _ = Rouge().compute_score(gold, results)
    cider, _ = Cider().compute_score(gold, results)
    return {"bleu4": float(bleu[3]), "rougeL": float(rouge), "cider": float(cider)}


def require_scorers() -> None:
    """Fails early, with the install line, when the COCO caption scorers are missing."""
    import importlib.util

    if importlib.util.find_spec("pycocoevalcap") is None:
        raise CaptionerError("caption metrics need pycocoevalcap: "
                             "pip install 'flax-captioner[train]'")


def exact_match(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """Fraction of images whose normalised prediction equals one of their normalised references."""
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(normalize_caption(predictions[key])
               in {normalize_caption(reference) for reference in references[key]}
               for key in predictions)
    return hits / len(predictions)
