"""The LLaVA-style comprehension model: image tokens spliced at the placeholder, the loss on answers only,
a tiny model that overfits a few questions, readers that name a malformed record, and the two training
stages from caption shards and a conversation file to toklip-ask's scores."""

import json
import re

import pytest
import torch
from PIL import Image

import toklip
from toklip.comprehension import (
    Conversation,
    MalformedRecord,
    PromptFormat,
    Turn,
    VisualLanguageModel,
    build_visual_input,
    load_language_model,
    make_tiny_language_model,
    read_conversations,
    read_questions,
    splice_image_tokens,
)
from toklip.comprehension.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER
from toklip.comprehension.data import ConversationEncoder, collate_conversations
from toklip.data import synthetic
from toklip.data.scene_questions import COUNT_WORDS, PLACE_WORDS, QuestionSetConfig, write_question_set

WORDS = ["what colour is it ? how many shapes are there red green blue yellow one two describe the image briefly ."]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_language_model(tmp_path_factory.mktemp("lm") / "lm", WORDS, width=64, depth=2, heads=4)


@pytest.fixture(scope="module")
def toklip_export(tmp_path_factory):
    from toklip.models.factory import export_toklip
    from toklip.models.presets import preset

    torch.manual_seed(0)
    model = toklip.build_toklip("tiny_64")
    return export_toklip(model.state_dict(), preset("tiny_64"), tmp_path_factory.mktemp("toklip") / "toklip.safetensors")


def test_the_projector_splices_exactly_n_image_tokens_at_the_placeholder():
    hidden, n = 4, 3
    ids = torch.tensor([[5, IMAGE_PLACEHOLDER, 6, 7, 0], [8, 9, IMAGE_PLACEHOLDER, 0, 0]])  # right-padded with 0
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    text = ids.clamp(min=0).float()[..., None].expand(-1, -1, hidden)  # each position holds its id
    image = -torch.arange(1, 2 * n + 1, dtype=torch.float).view(2, n, 1).expand(-1, -1, hidden)
    for side in ("right", "left"):
        embeddings, spliced_mask, spliced_labels = splice_image_tokens(text, ids, mask, image, labels, padding_side=side)
        assert embeddings.shape == (2, 4 - 1 + n, hidden)  # the longer row: 4 tokens, the placeholder now n
        assert spliced_mask.sum(1).tolist() == [4 - 1 + n, 3 - 1 + n]
        rows = [embeddings[b][spliced_mask[b].bool()][:, 0].tolist() for b in range(2)]
        assert rows == [[5, -1, -2, -3, 6, 7], [8, 9, -4, -5, -6]]
        kept = [spliced_labels[b][spliced_mask[b].bool()].tolist() for b in range(2)]
        assert kept == [[IGNORE_INDEX] * 4 + [6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
        padding = spliced_mask[1] == 0
        assert (spliced_labels[1][padding] == IGNORE_INDEX).all() and padding[0 if side == "left" else -1]
    with pytest.raises(ValueError, match="sample 0 has 2 image placeholders"):
        splice_image_tokens(text, ids.masked_fill(ids == 5, IMAGE_PLACEHOLDER), mask, image)


def test_labels_cover_only_the_answers_and_the_loss_is_theirs(tiny_lm):
    model, tokenizer = load_language_model(tiny_lm)
    conversation = Conversation("x.jpg", (Turn("<image>\nwhat colour is it?", "red"), Turn("how many shapes are there?", "two")))
    ids, labels = PromptFormat().encode(tokenizer, conversation)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and ids[0] == tokenizer.bos_token_id
    learnt = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learnt == ["red", "</s>", "two", "</s>"]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # The model's loss is the mean next-token cross-entropy over exactly those positions.
    vision = FixedFeatures(num_tokens=2, width=8)
    mllm = VisualLanguageModel(vision, model, tokenizer).eval()
    batch = collate_conversations([{"image": torch.zeros(3, 8, 8), **ConversationEncoder(tokenizer)(conversation)}], tokenizer.pad_token_id)
    loss = mllm(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    embeddings, mask, spliced = mllm.embed(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(inputs_embeds=embeddings, attention_mask=mask).logits[0]
    targets = spliced[0, 1:]
    picked = targets != IGNORE_INDEX
    assert picked.sum() == 4
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:-1][picked], targets[picked]))


class FixedFeatures(toklip.comprehension.vision.VisualInput):
    """A stand-in visual input: the image's mean colour, repeated (no files needed)."""

    kind = "fixed"

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__(image_size=8)
        self.num_tokens, self.width = num_tokens, width

    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.mean((2, 3))
        return colour.repeat(1, self.width // 3 + 1)[:, None, : self.width].expand(-1, self.num_tokens, -1)


def solid(colour: tuple[int, int, int], size: int = 64) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float).view(3, 1, 1).expand(3, size, size) / 127.5 - 1


def test_a_tiny_mllm_on_vq_codes_overfits_a_handful_of_questions(tiny_lm, frozen_parts):
    torch.manual_seed(0)
    language_model, tokenizer = load_language_model(tiny_lm)
    codes = build_visual_input({"kind": "codes", "tokenizer": "llamagen_tiny", "checkpoint": frozen_parts[1], "width": 32}, 64)
    model = VisualLanguageModel(codes, language_model, tokenizer)
    facts = {
        "red": ((220, 40, 40), "one"),
        "green": ((40, 170, 60), "two"),
        "blue": ((40, 70, 220), "one"),
        "yellow": ((240, 220, 40), "two"),
    }
    conversations = [
        Conversation(name, (Turn(f"<image>\n{question}", answer),))
        for name, (_, count) in facts.items()
        for question, answer in (("what colour is it?", name), ("how many shapes are there?", count))
    ]
    images = torch.stack([solid(rgb) for rgb, _ in facts.values()])
    samples = [{"image": images[i // 2], **ConversationEncoder(tokenizer)(c)} for i, c in enumerate(conversations)]
    batch = collate_conversations(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(120):
        loss = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first
    model.eval()
    assert model.answer(images, ["what colour is it?"] * 4, max_new_tokens=4) == list(facts)
    assert model.answer(images, ["how many shapes are there?"] * 4, max_new_tokens=4) == [count for _, count in facts.values()]
    # Multiple choice: the likeliest of a question's choices, whatever the model would have generated.
    from toklip.comprehension import Question, answer_questions, question_accuracy

    by_name = dict(zip(facts, images))
    questions = [Question(name, "what colour is it?", name, type="colour", choices=("green", name)) for name in facts]
    questions += [
        Question(name, "how many shapes are there?", count, type="count", choices=("one", "two")) for name, (_, count) in facts.items()
    ]
    answers = answer_questions(model, questions, by_name.__getitem__, batch_size=3)
    assert answers == [q.answer for q in questions]
    assert question_accuracy(questions, answers) == {"accuracy": 1.0, "questions": 8.0, "accuracy/colour": 1.0, "accuracy/count": 1.0}
    beside_the_point = [Question(name, "what colour is it?", "one", choices=("one", "two")) for name in facts]
    assert set(answer_questions(model, beside_the_point, by_name.__getitem__)) <= {"one", "two"}  # a choice, not the colour it knows


def test_a_feature_memo_encodes_each_image_once_and_changes_nothing(toklip_export):
    plain = build_visual_input({"kind": "toklip", "checkpoint": toklip_export}, 64)
    memo = build_visual_input({"kind": "toklip", "checkpoint": toklip_export, "memo": 8}, 64)
    memo.position_embedding = plain.position_embedding
    calls = []
    encode = memo.encode_frozen
    memo.encode_frozen = lambda images: calls.append(len(images)) or encode(images)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(memo(images), plain(images))
    torch.testing.assert_close(memo(images[[2, 0]]), plain(images[[2, 0]]))
    assert calls == [4]  # the second call found both images
    memo(torch.rand(6, 3, 64, 64))  # ten images for eight places: the least recently used two go (1 and 3)
    memo(images[[2, 0]])
    memo(images[[1, 3]])
    assert calls == [4, 6, 2] and len(memo.memo.entries) == 8  # 2 and 0, used last, stayed; 1 and 3 came back


def test_every_visual_input_adds_a_learned_embedding_of_its_tokens_places(toklip_export, frozen_parts):
    teacher, vq, _ = frozen_parts
    specs = {
        "toklip": {"checkpoint": toklip_export},
        "codes": {"tokenizer": "llamagen_tiny", "checkpoint": vq, "width": 16},
        "teacher": {"model": "tiny_teacher_64", "checkpoint": teacher},
    }
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    for kind, spec in specs.items():
        placed = build_visual_input({"kind": kind, **spec}, 64)
        assert placed.position_embedding.shape == (placed.num_tokens, placed.width) and placed.position_embedding.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(placed(images), placed.adapt(placed.encode_frozen(images)) + placed.position_embedding)
        plain = build_visual_input({"kind": kind, **spec, "position_embedding": False}, 64)
        assert plain.position_embedding is None and "position_embedding" not in dict(plain.named_parameters())


def test_the_conversation_and_question_readers_name_a_malformed_record(tmp_path):
    good = {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "x"}]}
    cases = {
        'no "image" path': {**good, "id": "b", "image": ""},
        "turn 1 must be": {**good, "id": "b", "conversations": [good["conversations"][0], {"from": "human", "value": "x"}]},
        "must hold <image> once": {**good, "id": "b", "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "x"}]},
        "human, gpt turn pairs": {**good, "id": "b", "conversations": []},
    }
    for problem, bad in cases.items():
        path = tmp_path / "conversations.json"
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(MalformedRecord, match=rf"{path}: record 1 \(id 'b'\): .*{problem}"):
            read_conversations(path)
    path = tmp_path / "questions.jsonl"
    lines = [
        {"image": "a.jpg", "question": "q?", "answer": "x"},
        {"question_id": 7, "image": "b.jpg", "question": "q?", "answer": "x", "choices": ["y", "z"]},
    ]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    with pytest.raises(MalformedRecord, match=rf"{path}: line 2 \(id 7\): the answer 'x' is not one of the choices"):
        read_questions(path)
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(MalformedRecord, match=rf"{path}: line 2: "):
        read_questions(path)
    path.write_text(json.dumps({"image": "a.jpg", "question": "q?"}) + "\n")
    with pytest.raises(MalformedRecord, match='line 1: no "answer"'):
        read_questions(path)


def test_scene_questions_ask_what_the_scene_shows(tmp_path):
    root = write_question_set(tmp_path / "set", QuestionSetConfig(train_images=6, test_images=4, image_size=32))
    conversations = read_conversations(root / "train.json")
    questions = read_questions(root / "test.jsonl")
    assert len(conversations) == 6 and all(5 <= len(c.turns) <= 6 for c in conversations)
    assert {q.type for q in questions} <= {"colour", "size", "shape", "background", "count", "position"}
    assert all(Image.open(root / "images" / q.image).size == (32, 32) for q in questions)
    for index in range(4):  # each answer is what its scene shows
        scene = synthetic.random_scene(synthetic.scene_rng(0, "questions-test", index), max_shapes=3)
        asked = {q.type: q for q in questions if q.image == f"test_{index:06d}.jpg"}
        assert (asked["background"].answer, asked["count"].answer) == (scene.background, COUNT_WORDS[len(scene.shapes)])
        (target,) = [s for s in scene.shapes if asked["colour"].question.endswith(f"{synthetic.POSITIONS[s.position][1]}?")]
        assert (asked["colour"].answer, asked["size"].answer, asked["shape"].answer) == (target.colour, target.size, target.shape)
        if "position" in asked:
            (located,) = [s for s in scene.shapes if asked["position"].question == f"where is the {s.colour} {s.shape}?"]
            assert asked["position"].answer == PLACE_WORDS[located.position]
    again = write_question_set(tmp_path / "set", QuestionSetConfig(train_images=6, test_images=4, image_size=32))
    assert (again / "test.jsonl").read_text() == (root / "test.jsonl").read_text()


def test_a_question_set_drawn_with_another_scene_vocabulary_is_drawn_again(tmp_path, monkeypatch):
    cfg = QuestionSetConfig(train_images=2, test_images=1, image_size=32)
    image = write_question_set(tmp_path, cfg) / "images" / "test_000000.jpg"
    shaded, stamp = image.read_bytes(), image.stat().st_mtime_ns
    write_question_set(tmp_path, cfg)
    assert image.stat().st_mtime_ns == stamp  # the same vocabulary: found, not drawn again
    monkeypatch.setattr(synthetic, "BACKGROUND_SHADING", 0)  # as an older toklip drew them
    write_question_set(tmp_path, cfg)
    assert image.read_bytes() != shaded


def compose(run_dir, overrides):
    from omegaconf import open_dict

    cfg = toklip.compose_config("train", ["experiment=tiny", "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def test_align_on_caption_shards_then_instruct_on_conversations_then_ask(tmp_path, tiny_lm, toklip_export, synthetic_set):
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from toklip.comprehension import load_comprehension
    from toklip.config import ConfigError
    from toklip.tasks import ask, train

    questions = write_question_set(tmp_path / "set", QuestionSetConfig(train_images=16, test_images=4, image_size=64))
    common = [
        "model=comprehension", "eval=none", f"llm.path={tiny_lm}", f"vision_input.checkpoint={toklip_export}", "vision_input.memo=64",
        "data.num_workers=0", "data.batch_size_per_device=4", "trainer.max_steps=3", "optim.warmup_steps=1",
    ]  # fmt: skip
    align = [
        *common,
        "data=caption_shards",
        f"data.train_urls='{synthetic_set.train_urls}'",
        "data.train_num_samples=256",
        "model.stage=align",
    ]
    metrics = train(compose(tmp_path / "align", align))
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["data/skipped_corrupt_image"] == 0
    aligned = tmp_path / "align" / "comprehension.safetensors"
    description = json.loads(json.loads((tmp_path / "align" / "comprehension.json").read_text())["comprehension"])
    assert description["stage"] == "align" and description["vision_input"]["kind"] == "toklip"
    from safetensors.torch import load_file

    aligned_keys = {"vision.position_embedding", *(f"projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))}
    assert set(load_file(aligned)) == aligned_keys  # the LM was frozen: not saved

    instruct = [*common, "data=conversations", f"data.conversations={questions / 'train.json'}", f"data.image_folder={questions / 'images'}",
                f"model.init={aligned}", "trainer.precision=bf16-mixed"]  # fmt: skip
    train(compose(tmp_path / "instruct", instruct))
    exported = tmp_path / "instruct" / "comprehension.safetensors"
    saved = load_file(exported)
    assert {k.split(".")[0] for k in saved} == {"projector", "language_model", "vision"}
    model = load_comprehension(exported)
    assert all(saved[k].equal(v) for k, v in model.state_dict().items() if k in saved)
    # The instruct stage started from the aligned projector (built as its run built it), then trained it on.
    start = load_file(aligned)
    starting = instantiate(compose(tmp_path / "instruct", instruct).model, _convert_="all").model.state_dict()
    assert all(starting[k].equal(v) for k, v in start.items()) and not all(saved[k].equal(v) for k, v in start.items())

    codes = [o for o in instruct if not o.startswith("vision_input.checkpoint=")]
    codes += ["vision_input=codes", "vision_input.width=16", f"tokenizer.checkpoint={vq_checkpoint(tmp_path)}"]
    with pytest.raises(Exception, match="trained with vision_input=toklip, this run reads codes") as raised:
        train(compose(tmp_path / "wrong", codes))
    assert isinstance(raised.value.__cause__, ConfigError)  # what the tools report in one line

    ask_cfg = toklip.compose_config(
        "ask", [f"checkpoint={exported}", f"questions={questions / 'test.jsonl'}", f"image_folder={questions / 'images'}"]
    )
    with open_dict(ask_cfg):
        ask_cfg.out = str(tmp_path / "answers")
    scores = ask(ask_cfg)
    assert scores["questions"] == sum(1 for _ in (questions / "test.jsonl").open()) and 0 <= scores["accuracy"] <= 1
    assert {"accuracy/colour", "accuracy/background"} <= set(scores)
    answers = [json.loads(line) for line in (tmp_path / "answers" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == scores["questions"] and all("prediction" in a for a in answers)
    with open_dict(ask_cfg):
        ask_cfg.questions, ask_cfg.captions, ask_cfg.image_folder = (
            None,
            str(synthetic_set.retrieval_captions),
            str(synthetic_set.retrieval_images),
        )
    scores = ask(ask_cfg)
    assert scores["captions"] == 20 and scores["cider"] >= 0
    with open_dict(ask_cfg):
        ask_cfg.captions, ask_cfg.image, ask_cfg.question = (
            None,
            str(questions / "images" / "test_000000.jpg"),
            "what colour is the background?",
        )
    with pytest.raises(ConfigError, match="question= is about one image: give image=<path>, and no image_folder="):
        ask(ask_cfg)  # the folder would be ignored
    with open_dict(ask_cfg):
        ask_cfg.image_folder = None
    assert isinstance(ask(ask_cfg)["answer"], str)


def test_a_conversation_epoch_resumed_mid_way_neither_replays_nor_skips_a_record(tmp_path, tiny_lm, monkeypatch):
    from toklip.comprehension import data as conversation_data
    from toklip.comprehension.data import ConversationDataModule, EpochShuffle

    root = write_question_set(tmp_path / "set", QuestionSetConfig(train_images=16, test_images=1, image_size=32))

    def make(rank=0, world_size=1):
        monkeypatch.setattr(conversation_data, "rank_and_world", lambda: (rank, world_size))
        data = ConversationDataModule(
            root / "train.json", root / "images", tokenizer=tiny_lm, image_size=32, batch_size_per_device=4, num_workers=0, seed=3
        )
        data.setup("fit")
        return data, data.train_dataloader()

    def epoch(data, loader, number, stop=None):
        data.sampler.set_epoch(number)  # as Lightning does
        batches = []
        for batch in loader:
            batches.append(tuple(data.on_before_batch_transfer(batch, 0)["image"].sum(dim=(1, 2, 3)).tolist()))
            if len(batches) == stop:
                break
        return batches

    data, loader = make()
    full = epoch(data, loader, 0) + epoch(data, loader, 1)
    first, loader = make()
    head = epoch(first, loader, 0, stop=3)
    assert first.state_dict() == {"epoch": 0, "batches": 3}
    resumed, loader = make()
    resumed.load_state_dict(first.state_dict())
    tail = epoch(resumed, loader, 0) + epoch(resumed, loader, 1)
    assert len(full) == 8 and head + tail == full
    assert resumed.state_dict() == {"epoch": 1, "batches": 4}  # the count restarts with each epoch
    at_the_end, loader = make()  # a checkpoint of epoch 0's last step resumes with the whole of epoch 1
    at_the_end.load_state_dict({"epoch": 0, "batches": 4})
    assert epoch(at_the_end, loader, 1) == full[4:]
    for rank in (0, 1):  # a position counts this rank's batches: 2 an epoch on each of two ranks
        whole_epoch = epoch(*make(rank, world_size=2), 0)
        resumed, loader = make(rank, world_size=2)
        resumed.load_state_dict({"epoch": 0, "batches": 1})
        assert len(whole_epoch) == 2 and epoch(resumed, loader, 0) == whole_epoch[1:]
    assert full[:4] != full[4:] and sorted(sum(full[:4], ())) == sorted(sum(full[4:], ()))  # a new order of the same records
    ranks = [list(EpochShuffle(range(10), seed=3, rank=rank, world_size=2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and sorted(ranks[0] + ranks[1]) == list(range(10))


def test_an_instruct_run_resumed_mid_epoch_ends_where_the_uninterrupted_run_does(tmp_path, tiny_lm, toklip_export):
    from safetensors.torch import load_file

    from toklip.tasks import train

    questions = write_question_set(tmp_path / "set", QuestionSetConfig(train_images=16, test_images=1, image_size=64))
    run = [
        "model=comprehension", "eval=none", f"llm.path={tiny_lm}", f"vision_input.checkpoint={toklip_export}", "data=conversations",
        f"data.conversations={questions / 'train.json'}", f"data.image_folder={questions / 'images'}", "data.num_workers=0",
        "data.batch_size_per_device=4", "optim.warmup_steps=1", "optim.total_steps=6", "callbacks.checkpoint.every_n_train_steps=3",
    ]  # fmt: skip
    train(compose(tmp_path / "whole", [*run, "trainer.max_steps=6"]))  # 4 batches an epoch: step 3 is mid-epoch
    train(compose(tmp_path / "parts", [*run, "trainer.max_steps=3"]))
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "step00000003.ckpt", weights_only=True)
    assert saved["ConversationDataModule"] == {"epoch": 0, "batches": 3}
    train(compose(tmp_path / "parts", [*run, "trainer.max_steps=6", "resume=latest"]))
    whole, parts = load_file(tmp_path / "whole" / "comprehension.safetensors"), load_file(tmp_path / "parts" / "comprehension.safetensors")
    assert whole.keys() == parts.keys() and all(torch.allclose(whole[k], parts[k], atol=1e-6) for k in whole)


def vq_checkpoint(tmp_path):
    from toklip.checkpoints import save_safetensors

    return save_safetensors(toklip.build_tokenizer("llamagen_tiny").state_dict(), tmp_path / "vq.safetensors")


def test_lora_trains_adapters_only_and_its_export_answers_as_the_module_did(tmp_path, tiny_lm, toklip_export):
    from toklip.comprehension import ComprehensionModule, load_comprehension

    module = ComprehensionModule(
        {"path": str(tiny_lm), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        {"kind": "toklip", "checkpoint": str(toklip_export)},
        image_size=64,
    )
    trained = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or name.split(".")[0] in ("projector", "vision") for name in trained)
    assert [name for name in trained if name.startswith("vision.")] == ["vision.position_embedding"]
    for name, parameter in module.model.named_parameters():  # as if trained: adapters that change the answers
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    module.export(tmp_path / "comprehension.safetensors")
    loaded = load_comprehension(tmp_path / "comprehension.safetensors")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    question = ["what colour is it?"] * 2
    assert loaded.answer(images, question, max_new_tokens=3) == module.model.eval().answer(images, question, max_new_tokens=3)


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_ranks_train_the_language_model_and_export_it_whole(tmp_path, tiny_lm, toklip_export, strategy, run_on_two_ranks):
    """Lightning re-launches the script for each rank, so this runs as its own program. FSDP2 shards each
    LM layer (DTensor weights); DDP keeps a whole copy on each rank."""
    from toklip.comprehension import load_comprehension
    from toklip.comprehension.language_model import load_language_model

    stdout, reports = run_on_two_ranks(f"""
        import lightning as L, torch
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        from toklip.comprehension import ComprehensionModule, Conversation, Turn
        from toklip.comprehension.data import ConversationEncoder, collate_conversations
        from toklip.training import ExportModel
        from toklip.training.strategies import ddp, fsdp2
        m = ComprehensionModule({{"path": {str(tiny_lm)!r}, "gradient_checkpointing": True}}, {{"kind": "toklip", "checkpoint": {str(toklip_export)!r}}},
                                image_size=64, optim={{"lr": 1e-3, "warmup_steps": 1, "total_steps": 2}})
        encode = ConversationEncoder(m.model.tokenizer)
        sample = {{"image": torch.zeros(3, 64, 64), **encode(Conversation("x", (Turn("<image>\\nwhat colour is it?", "red"),)))}}
        batches = [collate_conversations([sample] * 2, m.model.tokenizer.pad_token_id)] * 2
        strategy = fsdp2(data_parallel_size=2) if {strategy!r} == "fsdp2" else ddp()
        t = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy=strategy, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[ExportModel({str(tmp_path)!r})])
        t.fit(m, torch.utils.data.DataLoader(batches, batch_size=None))
        layers = m.model.language_model.model.layers
        layer = layers[0].self_attn.q_proj.weight
        whole = layer.full_tensor() if isinstance(layer, DTensor) else layer
        print(f"rank {{t.global_rank}} steps {{t.global_step}} weights {{type(layer).__name__}}")
        report = [isinstance(layers[0], FSDPModule), float(whole.detach().double().sum())]
    """)
    kind, sharded = ("DTensor", True) if strategy == "fsdp2" else ("Parameter", False)
    assert f"rank 0 steps 2 weights {kind}" in stdout and f"rank 1 steps 2 weights {kind}" in stdout
    assert reports[0] == reports[1] and reports[0][0] == sharded  # each layer its own FSDP2 unit; one model on both ranks
    model = load_comprehension(tmp_path / "comprehension.safetensors")  # whole (gathered from the shards under FSDP2)
    exported = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert exported.shape == (64, 64) and float(exported.double().sum()) == pytest.approx(reports[0][1], abs=1e-6)
    untrained = load_language_model(tiny_lm)[0].model.layers[0].self_attn.q_proj.weight
    assert (exported - untrained).abs().max() > 1e-4  # the language model trained, and its export is the trained one


def test_fsdp_wraps_each_decoder_layer_of_any_hugging_face_lm():
    """FSDP1's wrap and activation-checkpointing units are Hugging Face's decoder-layer base class, not one
    architecture's layer, and the token encoder's causal block."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from toklip.training.strategies import fsdp

    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "vocab_size": 32}  # fmt: skip
    strategy = fsdp(activation_checkpointing=True)
    policies = {"wrap": strategy.kwargs["auto_wrap_policy"], "checkpoint": strategy._activation_checkpointing_kwargs["auto_wrap_policy"]}
    toklip_model = toklip.build_toklip("tiny_64")
    for model, layers in (
        (Qwen2ForCausalLM(Qwen2Config(**sizes)), lambda m: list(m.model.layers)),
        (LlamaForCausalLM(LlamaConfig(**sizes)), lambda m: list(m.model.layers)),
        (toklip_model.visual.trunk, lambda m: list(m.blocks)),
    ):
        for policy in policies.values():
            assert [m for m in model.modules() if policy(m, recurse=False, nonwrapped_numel=0)] == layers(model)


def test_an_export_of_other_sizes_is_refused_naming_the_weights(tmp_path, tiny_lm, frozen_parts):
    from toklip.comprehension import ComprehensionModule, load_comprehension
    from toklip.config import ConfigError

    def module(width: int, init=None) -> ComprehensionModule:
        codes = {"kind": "codes", "tokenizer": "llamagen_tiny", "checkpoint": str(frozen_parts[1]), "width": width}
        return ComprehensionModule({"path": str(tiny_lm)}, codes, image_size=64, stage="align", init=init)

    module(16).export(tmp_path / "comprehension.safetensors")
    every_mismatch = re.escape(
        "3 with another shape: projector.0.weight (model (64, 32), checkpoint (64, 16)), vision.embedding.weight "
        "(model (1024, 32), checkpoint (1024, 16)), vision.position_embedding (model (64, 32), checkpoint (64, 16))"
    )
    with pytest.raises(ConfigError, match=r"other sizes .*" + every_mismatch):
        module(32, init=tmp_path / "comprehension.safetensors")
    description = tmp_path / "comprehension.json"
    description.write_text(description.read_text().replace('\\"width\\": 16', '\\"width\\": 32'))
    with pytest.raises(ValueError, match=every_mismatch):
        load_comprehension(tmp_path / "comprehension.safetensors")


def test_readers_refuse_blank_turns_and_misplaced_images_and_skip_text_only_records(tmp_path, caplog):
    good = {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "x"}]}
    blank = {**good, "id": "b", "conversations": [good["conversations"][0], {"from": "gpt", "value": "  "}]}
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([good, blank]))
    with pytest.raises(MalformedRecord, match=r"record 1 \(id 'b'\): turn 1 must be .*not blank"):
        read_conversations(path)
    # LLaVA-1.5's mix665k holds text-only records (no image, no <image>): skipped and counted, not an error.
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hello?"}, {"from": "gpt", "value": "hi"}]}
    path.write_text(json.dumps([good, text_only, text_only]))
    with caplog.at_level("WARNING", logger="toklip.comprehension.conversation"):
        assert [c.id for c in read_conversations(path)] == ["a"]
    assert "skipped 2 text-only record(s) of 3, the first" in caplog.text and "record 1 (id 't')" in caplog.text
    path.write_text(json.dumps([{**text_only, "conversations": [{"from": "human", "value": "<image>\nq?"}, good["conversations"][1]]}]))
    with pytest.raises(MalformedRecord, match='record 0 .*no "image" path'):
        read_conversations(path)  # an <image> with no image is malformed, not text-only

    questions = tmp_path / "questions.jsonl"
    cases = {
        "the question holds <image> more than once": {"question": "<image> or <image>?"},
        'no "answer" \\(a string, not blank\\)': {"answer": " "},
        '"type" must be a string': {"type": 3},
    }
    for problem, change in cases.items():
        questions.write_text(json.dumps({"image": "a.jpg", "question": "q?", "answer": "x", **change}) + "\n")
        with pytest.raises(MalformedRecord, match=rf"line 1: {problem}"):
            read_questions(questions)
    questions.write_text(json.dumps({"image": "a.jpg", "question": "q?", "answer": "x", "type": None}) + "\n")
    assert read_questions(questions)[0].type == ""  # not "None"
    questions.write_text("\n")
    with pytest.raises(MalformedRecord, match=rf"{questions}: no questions in it"):
        read_questions(questions)


def test_an_image_tag_in_an_answer_is_text_and_a_cut_keeps_the_image_and_an_answer(tiny_lm, tmp_path, caplog):
    from toklip.comprehension.data import ConversationDataset, CutTooShort

    _, tokenizer = load_language_model(tiny_lm)
    quoted = Conversation("x.jpg", (Turn("<image>\nwhat colour is it?", "red <image>"),))
    ids, labels = PromptFormat().encode(tokenizer, quoted)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and IMAGE_PLACEHOLDER not in labels  # the answer's tag is only words
    conversation = Conversation("x.jpg", (Turn("<image>\nwhat colour is it?", "red"), Turn("how many shapes are there?", "two")))
    ids, labels = PromptFormat().encode(tokenizer, conversation)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    kept = ConversationEncoder(tokenizer, max_length=first_answer + 1)(conversation)  # the second turn cut off
    assert kept["input_ids"].tolist() == ids[: first_answer + 1] and kept["labels"][-1] == labels[first_answer]
    with pytest.raises(CutTooShort, match="max_length=.* cuts it before its image or its first answer"):
        ConversationEncoder(tokenizer, max_length=first_answer)(conversation)  # no answer left to learn
    question_first = Conversation("x.jpg", (Turn("what colour is it?\n<image>", "red"),))
    with pytest.raises(CutTooShort):
        ConversationEncoder(tokenizer, max_length=4)(question_first)  # the image cut off
    # In a data set such a record is skipped with a warning naming it, like an unreadable image.
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    dataset = ConversationDataset([conversation], tmp_path, lambda image: torch.zeros(3), ConversationEncoder(tokenizer, max_length=3))
    with caplog.at_level("WARNING", logger="toklip.comprehension.data"):
        assert dataset[0] is None
    assert "skipped conversation 0 (no id): max_length=3 cuts it" in caplog.text


def test_a_sample_longer_than_the_language_models_context_is_refused(tmp_path):
    lm = make_tiny_language_model(tmp_path / "lm", WORDS, width=32, depth=1, heads=2, max_length=26)
    model, tokenizer = load_language_model(lm)
    mllm = VisualLanguageModel(FixedFeatures(num_tokens=16, width=8), model, tokenizer).eval()
    images = torch.zeros(1, 3, 8, 8)
    assert mllm.answer(images, ["what colour is it?"], max_new_tokens=1)  # 16 image and 10 text tokens: 26 fit in 26
    with pytest.raises(
        ValueError, match=r"sample 0: its 16 image and 12 text tokens make 28, more than the language model's context of 26"
    ):
        mllm.answer(images, ["what colour is it ? one two"], max_new_tokens=1)


def test_conversations_too_few_for_a_batch_on_every_rank_are_refused(tmp_path, tiny_lm, monkeypatch):
    from toklip.comprehension import data

    records = [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "x"}]}] * 6
    (tmp_path / "c.json").write_text(json.dumps(records))
    module = data.ConversationDataModule(tmp_path / "c.json", tmp_path, tokenizer=tiny_lm, image_size=64, batch_size_per_device=4)
    monkeypatch.setattr(data, "rank_and_world", lambda: (0, 2))
    with pytest.raises(ValueError, match=r"6 record\(s\) \(fraction 1.0\), fewer than a batch of 4 on each of 2 rank\(s\)"):
        module.setup("fit")  # 3 a rank: no whole batch, and Lightning would fit nothing without a word


def test_comprehension_settings_are_typed_and_an_export_starts_only_the_run_that_trains_it_all(
    tmp_path, tiny_lm, toklip_export, monkeypatch
):
    from safetensors.torch import load_file

    from toklip.comprehension import ComprehensionModule
    from toklip.config import ConfigError

    vision = {"kind": "toklip", "checkpoint": str(toklip_export)}
    for spec, problem in (
        ({**vision, "position_embedding": "no"}, "vision_input.position_embedding='no': expected bool"),
        ({**vision, "memo": -1}, "vision_input.memo=-1: how many images"),
        ({**vision, "memmo": 3}, "vision_input.memmo: .* takes no such argument"),
    ):
        with pytest.raises(ConfigError, match=problem):
            build_visual_input(spec, image_size=64)
    with pytest.raises(ConfigError, match="llm.gradient_checkpointing='flase': expected true or false"):
        ComprehensionModule({"path": str(tiny_lm), "gradient_checkpointing": "flase"}, vision, image_size=64)

    monkeypatch.chdir(toklip_export.parent)  # a relative TokLIP path: the export records it whole
    torch.manual_seed(0)
    instructed = ComprehensionModule({"path": str(tiny_lm)}, {**vision, "checkpoint": toklip_export.name}, image_size=64, stage="instruct")
    exported = instructed.export(tmp_path / "instruct" / "comprehension.safetensors")
    monkeypatch.chdir(tmp_path)
    assert toklip.comprehension.load_comprehension(exported).vision.toklip is not None
    trained_lm = {k for k in load_file(exported) if k.startswith("language_model.")}
    assert trained_lm
    for settings in ({"stage": "align"}, {"stage": "instruct", "llm": {"path": str(tiny_lm), "lora": {"r": 2}}}):
        llm = settings.get("llm", {"path": str(tiny_lm)})
        with pytest.raises(ConfigError, match=rf"its instruct stage trained {len(trained_lm)} weight\(s\) that this run does not train"):
            ComprehensionModule(llm, vision, image_size=64, stage=settings["stage"], init=exported)
    again = ComprehensionModule({"path": str(tiny_lm)}, vision, image_size=64, stage="instruct", init=exported)
    assert all(again.model.state_dict()[k].equal(v) for k, v in load_file(exported).items())


def test_ask_checks_every_image_of_a_question_file_before_it_loads_a_model(tmp_path):
    from omegaconf import open_dict

    from toklip.tasks import ask

    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.jpg", "question": "q?", "answer": "x"}) for i in range(3)))
    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    cfg = toklip.compose_config(
        "ask", [f"checkpoint={tmp_path / 'none.safetensors'}", f"questions={tmp_path / 'q.jsonl'}", f"image_folder={tmp_path}"]
    )
    with open_dict(cfg):
        cfg.out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 images of questions=.*q\.jsonl are missing, e.g. .*1\.jpg"):
        ask(cfg)  # not the missing checkpoint: nothing was loaded
