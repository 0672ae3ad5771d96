"""Questions about synthetic scenes, read off the scene grammar (toklip.data.synthetic): a question set
for comprehension models, with its images, in LLaVA's conversation format and as a question file.

Each image gets one question of each type (a type is skipped where the scene cannot ask it):
    colour      what colour is the shape on the left?      red
    size        is the shape on the left small or large?   small
    shape       which shape is on the left?                circle
    background  what colour is the background?             black
    count       how many shapes are there?                 two
    position    where is the red circle?                   left
The shape asked about is named by its place (its kind, colour and size are what is asked); the
position question names a shape by colour and kind, which only one shape of the scene may have.

Layout written by `write_question_set(root, ...)`:
    root/images/<split>_<index>.jpg
    root/train.json      LLaVA conversations: each training image with all its questions, in random order
    root/captions.json   the same images' captions, as LLaVA's caption records
    root/test.jsonl      the held-out images' questions, one a line, with their type
    root/manifest.json   the parameters and scene vocabulary; an equal one means the set is already there
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .synthetic import POSITIONS, Scene, random_scene, render, scene_rng, scene_vocabulary

CAPTION_INSTRUCTION = "Describe the image briefly."  # LLaVA's pretraining records ask for a caption in such words
QUESTION_TYPES = ("colour", "size", "shape", "background", "count", "position")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")
PLACE_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "middle"}


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) of each type the scene can ask, in QUESTION_TYPES order."""
    target = rng.choice(scene.shapes)
    where = POSITIONS[target.position][1]
    questions = [
        ("colour", f"what colour is the shape {where}?", target.colour),
        ("size", f"is the shape {where} small or large?", target.size),
        ("shape", f"which shape is {where}?", target.shape),
        ("background", "what colour is the background?", scene.background),
        ("count", "how many shapes are there?", COUNT_WORDS[len(scene.shapes)]),
    ]
    named = [(s.colour, s.shape) for s in scene.shapes]
    unique = [s for s in scene.shapes if named.count((s.colour, s.shape)) == 1]
    if unique:
        located = rng.choice(unique)
        questions.append(("position", f"where is the {located.colour} {located.shape}?", PLACE_WORDS[located.position]))
    return questions


@dataclass(frozen=True)
class QuestionSetConfig:
    seed: int = 0
    image_size: int = 32
    train_images: int = 2048
    test_images: int = 400
    max_shapes: int = 3


def _draw(root: Path, cfg: QuestionSetConfig, split: str, index: int) -> tuple[str, Scene, list[tuple[str, str, str]]]:
    """Render one image of a split; its file name, scene and questions."""
    rng = scene_rng(cfg.seed, f"questions-{split}", index)
    scene = random_scene(rng, cfg.max_shapes)
    name = f"{split}_{index:06d}.jpg"
    render(scene, cfg.image_size, rng).save(root / "images" / name, quality=95)
    return name, scene, scene_questions(scene, rng)


def write_question_set(root: str | Path, cfg: QuestionSetConfig = QuestionSetConfig()) -> Path:
    """Write (or find already written, for the same parameters) a question set under `root`."""
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = json.dumps({**asdict(cfg), "vocabulary": scene_vocabulary()}, sort_keys=True)
    if manifest.is_file() and manifest.read_text() == wanted:
        return root
    manifest.unlink(missing_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records, captions = [], []
    for index in tqdm(range(cfg.train_images), desc="question set (train)", unit="img", leave=False):
        name, scene, questions = _draw(root, cfg, "train", index)
        order = random.Random(f"{cfg.seed}/order/{index}")
        order.shuffle(questions)
        turns = []
        for i, (_, question, answer) in enumerate(questions):
            turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
        key = name.removesuffix(".jpg")
        records.append({"id": key, "image": name, "conversations": turns})
        caption = [
            {"from": "human", "value": f"<image>\n{CAPTION_INSTRUCTION}"},
            {"from": "gpt", "value": scene.caption(order.randrange(3))},
        ]
        captions.append({"id": key, "image": name, "conversations": caption})
    (root / "train.json").write_text(json.dumps(records) + "\n")
    (root / "captions.json").write_text(json.dumps(captions) + "\n")
    lines = []
    for index in tqdm(range(cfg.test_images), desc="question set (test)", unit="img", leave=False):
        name, _, questions = _draw(root, cfg, "test", index)
        lines += [
            json.dumps({"question_id": f"{name.removesuffix('.jpg')}_{kind}", "image": name, "question": q, "answer": a, "type": kind})
            for kind, q, a in questions
        ]
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    manifest.write_text(wanted)  # last: a set interrupted half-way is never taken as complete
    return root
