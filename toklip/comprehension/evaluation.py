"""Scores of a comprehension model: question accuracy (exact match of the generated answer, or the
most likely of a question's choices) overall and per question type, and CIDEr of generated captions
(pycocoevalcap's scorer, with whitespace tokenization: it needs no Java)."""

from __future__ import annotations

import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.eval_sets import RetrievalSet, load_image
from ..data.transforms import eval_transform, preprocess_config
from .conversation import Conversation, Question, Turn, with_image_tag
from .data import CAPTION_INSTRUCTION
from .model import VisualLanguageModel

ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, spaces collapsed (VQA's answer normalisation, in short)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def image_loader(image_folder: str | os.PathLike, image_size: int) -> Callable[[str], torch.Tensor]:
    """A relative image path -> the model's input (the training data's preprocessing); a failure names the file."""
    transform, folder = eval_transform(preprocess_config(image_size)), Path(image_folder)

    def load(name: str) -> torch.Tensor:
        return load_image(folder / name, transform)

    return load


def answer_questions(
    model: VisualLanguageModel,
    questions: Sequence[Question],
    load_image: Callable[[str], torch.Tensor],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> list[str]:
    """The model's answer to each question: generated, or for a question with choices the likeliest choice."""
    device = next(model.projector.parameters()).device
    answers = []
    for batch in tqdm(list(_batches(questions, batch_size)), desc="questions", unit="batch", leave=False):
        images = torch.stack([load_image(q.image) for q in batch]).to(device)
        open_ended = [i for i, q in enumerate(batch) if not q.choices]  # only these are generated
        questions_asked = [batch[i].question for i in open_ended]
        generated = model.answer(images[open_ended], questions_asked, max_new_tokens=max_new_tokens) if open_ended else []
        by_index = dict(zip(open_ended, generated))
        answers += [by_index[i] if i in by_index else most_likely_choice(model, images[i], q) for i, q in enumerate(batch)]
    return answers


@torch.no_grad()
def most_likely_choice(model: VisualLanguageModel, image: torch.Tensor, question: Question) -> str:
    candidates = [Conversation(question.image, (Turn(with_image_tag(question.question), choice),)) for choice in question.choices]
    scores = model.answer_log_likelihoods(image.expand(len(candidates), -1, -1, -1), candidates)
    return question.choices[int(scores.argmax())]


def question_accuracy(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, float]:
    """`accuracy` over all questions and `accuracy/<type>` per question type (normalised exact match)."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for question, answer in zip(questions, answers, strict=True):
        by_type[question.type].append(normalize_answer(answer) == normalize_answer(question.answer))
    everything = [hit for hits in by_type.values() for hit in hits]
    scores = {"accuracy": statistics.fmean(everything), "questions": float(len(everything))}
    scores |= {f"accuracy/{kind}": statistics.fmean(hits) for kind, hits in sorted(by_type.items()) if kind}
    return scores


def caption_scores(
    model: VisualLanguageModel,
    captions: RetrievalSet,
    *,
    instruction: str = CAPTION_INSTRUCTION,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> tuple[dict[str, float], list[str]]:
    """CIDEr-D of the model's captions of a caption set's images (`data.eval_sets.RetrievalSet`, COCO-style),
    and the captions."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("caption scores use pycocoevalcap's CIDEr: pip install 'toklip[comprehension]'") from None
    device = next(model.projector.parameters()).device
    generated = []
    for batch in tqdm(list(_batches(range(len(captions)), batch_size)), desc="captions", unit="batch", leave=False):
        images = torch.stack([captions[i][0] for i in batch]).to(device)
        generated += model.answer(images, [instruction] * len(batch), max_new_tokens=max_new_tokens)
    references = defaultdict(list)
    for text, image in zip(captions.texts, captions.text_to_image.tolist()):
        references[image].append(normalize_answer(text))
    candidates = {i: [normalize_answer(text)] for i, text in enumerate(generated)}
    cider, _ = Cider().compute_score(references, candidates)
    return {"cider": float(cider), "captions": float(len(generated))}, generated
