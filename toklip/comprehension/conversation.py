"""Conversations about images: LLaVA's JSON records, GQA-style question files, and their token ids.

LLaVA's format, a JSON list of records:
    {"id": "...", "image": "relative/path.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is ...?"}, {"from": "gpt", "value": "red"}, ...]}
Turns alternate human, gpt, human, gpt ...; the first human turn holds the one `<image>` placeholder.

A question file, JSON lines (GQA-style): {"image": "...", "question": "...", "answer": "..."}, and
optionally "question_id", "type" (accuracy is reported per type) and "choices" (multiple choice).

The prompt is LLaVA-1.5's (Vicuna v1) layout, for any tokenizer: `USER: <image>\\n{question} ASSISTANT: {answer}</s>`
a turn, with the tokenizer's own BOS and EOS. The placeholder is not a token of the vocabulary: it is
`IMAGE_PLACEHOLDER` in the ids, which the model replaces by the image's tokens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
IMAGE_PLACEHOLDER = -200  # the image's place in the ids: never an id of a vocabulary
IGNORE_INDEX = -100  # a label the loss skips (prompt, image and padding positions)
ROLES = ("human", "gpt")


class MalformedRecord(ValueError):
    """A record of a conversation or question file that cannot be read; the message names it."""


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class Conversation:
    """One image and the question-answer turns about it (the first question holds `<image>`)."""

    image: str
    turns: tuple[Turn, ...]
    id: str = ""


@dataclass(frozen=True)
class Question:
    image: str
    question: str
    answer: str
    question_id: str = ""
    type: str = ""
    choices: tuple[str, ...] = ()


def _record_name(path: str | os.PathLike, where: str, record: Any) -> str:
    named = record.get("id", record.get("question_id")) if isinstance(record, dict) else None
    return f"{path}: {where}" + (f" (id {named!r})" if named is not None else "")


def _turns(record: dict[str, Any]) -> list[str]:
    """The values of a record's turns, checked: human, gpt, human, gpt ..., none of them blank."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ValueError('"conversations" must be a non-empty list of human, gpt turn pairs')
    for i, turn in enumerate(turns):
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or turn.get("from") != ROLES[i % 2] or not isinstance(value, str) or not value.strip():
            raise ValueError(f'turn {i} must be {{"from": "{ROLES[i % 2]}", "value": "<not blank>"}}, got {turn!r}')
    return [turn["value"] for turn in turns]


def _conversation(record: Any) -> Conversation | None:
    """One LLaVA record, checked (a problem is a ValueError saying what is wrong); None for a text-only
    record (no "image", no `<image>` in its turns: LLaVA-1.5's mix665k holds some 40k of them)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    values = _turns(record)
    if "image" not in record and not any(IMAGE_TAG in value for value in values):
        return None
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError('no "image" path')
    questions, answers = values[::2], values[1::2]
    if questions[0].count(IMAGE_TAG) != 1 or any(IMAGE_TAG in q for q in questions[1:]):
        raise ValueError(f"the first human turn must hold {IMAGE_TAG} once, and no other turn")
    return Conversation(image=image, turns=tuple(map(Turn, questions, answers)), id=str(record.get("id", "")))


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """A LLaVA conversation file (a JSON list); the first malformed record is an error naming it.
    Text-only records (no image, no `<image>`) are skipped, with one warning that counts them."""
    try:
        records = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise MalformedRecord(f"{path}: not JSON ({err})") from None
    if not isinstance(records, list):
        raise MalformedRecord(f"{path}: expected a JSON list of conversation records, got {type(records).__name__}")
    conversations, text_only = [], []
    for index, record in enumerate(records):
        try:
            conversation = _conversation(record)
        except ValueError as err:
            raise MalformedRecord(f"{_record_name(path, f'record {index}', record)}: {err}") from None
        if conversation is None:
            text_only.append(_record_name(path, f"record {index}", record))
        else:
            conversations.append(conversation)
    if text_only:
        log.warning("skipped %d text-only record(s) of %d, the first %s: the model reads conversations about an image",
                    len(text_only), len(records), text_only[0])  # fmt: skip
    return conversations


def _question(record: Any) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    for key in ("image", "question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f'no "{key}" (a string, not blank)')
    if record["question"].count(IMAGE_TAG) > 1:
        raise ValueError(f"the question holds {IMAGE_TAG} more than once (it may place the image once, or leave it first)")
    choices = record.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError('"choices" must be a list of strings')
    if choices and record["answer"] not in choices:
        raise ValueError(f"the answer {record['answer']!r} is not one of the choices {choices}")
    kind = record.get("type") or ""
    if not isinstance(kind, str):
        raise ValueError(f'"type" must be a string, got {kind!r}')
    return Question(record["image"], record["question"], record["answer"], str(record.get("question_id", "")), kind, tuple(choices))


def read_questions(path: str | os.PathLike) -> list[Question]:
    """A question file (JSON lines); the first malformed line is an error naming it, and so is a file of none."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            questions.append(_question(json.loads(line)))
        except (ValueError, json.JSONDecodeError) as err:
            raise MalformedRecord(f"{_record_name(path, f'line {number}', _loads_or_none(line))}: {err}") from None
    if not questions:
        raise MalformedRecord(f"{path}: no questions in it")
    return questions


def _loads_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def caption_conversation(image: str, caption: str, instruction: str) -> Conversation:
    """A caption as one turn: the alignment stage's data (LLaVA's pretraining records are the same)."""
    return Conversation(image=image, turns=(Turn(f"{IMAGE_TAG}\n{instruction}", caption),))


def with_image_tag(question: str) -> str:
    """A question as the first turn about an image: `<image>` first, unless it places the tag itself."""
    return question if IMAGE_TAG in question else f"{IMAGE_TAG}\n{question}"


@dataclass(frozen=True)
class PromptFormat:
    """The Vicuna v1 layout of LLaVA-1.5, over any Hugging Face tokenizer."""

    user: str = "USER: "
    assistant: str = " ASSISTANT: "
    between_turns: str = " "

    def encode(self, tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[int]]:
        """Ids and labels of a whole conversation: labels are the ids on the answers (and the EOS that
        ends each), IGNORE_INDEX elsewhere; the image is one IMAGE_PLACEHOLDER id."""
        ids, labels = [], []

        def add(text: str, learn: bool) -> None:
            pieces = [text] if learn else text.split(IMAGE_TAG)  # an answer's "<image>" is only text
            for i, piece in enumerate(pieces):
                if i:
                    ids.append(IMAGE_PLACEHOLDER)
                    labels.append(IGNORE_INDEX)
                piece_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
                ids.extend(piece_ids)
                labels.extend(piece_ids if learn else [IGNORE_INDEX] * len(piece_ids))

        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for i, turn in enumerate(conversation.turns):
            add((self.between_turns if i else "") + self.user + turn.question + self.assistant, learn=False)
            add(turn.answer, learn=True)
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        return ids, labels

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        """The ids of one question awaiting its answer (`<image>` is prepended when the question lacks it)."""
        ids, _ = self.encode(tokenizer, Conversation(image="", turns=(Turn(with_image_tag(question), ""),)))
        return ids[:-1]  # without the answer's EOS


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """(B, length or the longest) int64, padded with `value` on `side`."""
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = length - len(sequence) if side == "left" else 0
        out[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def pad_batch(
    ids: Sequence[Sequence[int]],
    pad_token_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    side: str = "right",
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Token id sequences (and their labels) as a batch: "input_ids" padded with `pad_token_id`,
    "attention_mask" (1 on the real tokens), "labels" padded with IGNORE_INDEX, all (B, length or the longest)."""
    batch = {
        "input_ids": pad_sequences(ids, pad_token_id, side, length),
        "attention_mask": pad_sequences([[1] * len(sequence) for sequence in ids], 0, side, length),
    }
    if labels is not None:
        batch["labels"] = pad_sequences(labels, IGNORE_INDEX, side, length)
    return batch
