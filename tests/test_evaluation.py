"""The evaluation metrics on small cases whose answers are worked out by hand."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from toklip.evaluation.metrics import RetrievalRecall, ZeroShotAccuracy, retrieval_recall, zeroshot_classifier

# 3 images x 5 captions; captions 0-1 are image 0's, 2 is image 1's, 3-4 are image 2's.
SCORES = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.2], [0.7, 0.3, 0.6, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4, 0.0]])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def test_retrieval_recall_counts_a_hit_within_the_top_k_both_ways():
    recall = {name: round(value.item(), 4) for name, value in retrieval_recall(SCORES, TEXT_TO_IMAGE, ks=(1, 2)).items()}
    # image -> text: images 0 and 2 find a caption of theirs first; image 1 finds image 0's first, its own second.
    # text -> image: captions 0 and 3 find their image first, caption 2 second, captions 1 and 4 third.
    assert recall == {"i2t_R@1": 0.6667, "i2t_R@2": 1.0, "t2i_R@1": 0.4, "t2i_R@2": 0.6}


def test_retrieval_over_part_of_the_images_keeps_their_captions_alone():
    texts = torch.eye(5)  # caption j's embedding is e_j, so an image's scores are its coordinates
    metric = RetrievalRecall(texts, TEXT_TO_IMAGE, ks=(1,))
    metric.update(SCORES[[2, 0]], torch.tensor([2, 0]))  # image 1 never came (a partial validation pass)
    # Left: images 0 and 2 and captions 0, 1, 3, 4. Each image's best caption is its own; captions 1 and 4
    # score higher on the other image (0.1 < 0.2 and 0.2 > 0.0), so text -> image finds 2 of 4.
    assert {name: value.item() for name, value in metric.compute().items()} == {"i2t_R@1": 1.0, "t2i_R@1": 0.5}


def test_zero_shot_accuracy_takes_the_closest_class_of_each_normalised_image():
    metric = ZeroShotAccuracy(torch.eye(3))
    metric.update(torch.tensor([[5.0, 1, 0], [0, 2, 1], [3, 0, 4], [0, 9, 1]]), torch.tensor([0, 1, 0, 2]))
    accuracy = metric.compute()
    assert accuracy["top1"].item() == 0.5 and accuracy["top5"].item() == 1.0  # top 5 of 3 classes: every one


def test_a_zero_shot_class_is_the_mean_of_its_normalised_prompts_renormalised():
    table = {"a x": [1.0, 0, 0], "b x": [0, 2.0, 0], "a y": [0, 0, 3.0], "b y": [0, 1.0, 0]}
    texts = list(table)

    def tokenizer(strings: list[str]) -> torch.Tensor:
        return torch.tensor([texts.index(s) for s in strings])

    def encode_text(tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = torch.tensor([table[texts[i]] for i in tokens.tolist()])
        return F.normalize(features, dim=-1) if normalize else features

    classes = SimpleNamespace(classnames=["x", "y"], templates=["a {}", "b {}"])
    classifier = zeroshot_classifier(SimpleNamespace(encode_text=encode_text), tokenizer, classes, "cpu")
    half = 2**-0.5
    torch.testing.assert_close(classifier, torch.tensor([[half, 0], [half, half], [0, half]]))  # (D, classes)
