"""The optional warm start: vq_mapping solved so token embeddings match the teacher's patch embeddings."""

import pytest
import torch

import toklip
from toklip.models.input_alignment import solve_token_embedding, token_embedding_statistics
from toklip.models.teacher import Teacher, build_open_clip


@pytest.fixture
def student_and_teacher():
    torch.manual_seed(0)
    return toklip.build_toklip("tiny_32"), Teacher("tiny_teacher_32", build_open_clip("tiny_teacher_32").state_dict())


def _fit_error(trunk, teacher, images):
    with torch.no_grad():
        hidden = trunk.vq_act(trunk.vq_table(trunk.vq.encode(images).codes.flatten(0, 2)))
        target = teacher.visual.trunk.patch_embed(images).flatten(0, 1)
        residual = (trunk.vq_mapping(hidden) - target).pow(2).sum()
        return float(residual), float(1 - residual / (target - target.mean(0)).pow(2).sum())


def test_vq_mapping_becomes_the_best_fit_and_r2_is_its_own(student_and_teacher):
    student, teacher = student_and_teacher
    trunk = student.visual.trunk
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, r2_at_init = _fit_error(trunk, teacher, images)
    r2 = solve_token_embedding(trunk, token_embedding_statistics(trunk, teacher, images))
    error, direct_r2 = _fit_error(trunk, teacher, images)
    assert r2 == pytest.approx(direct_r2, abs=1e-3) and r2 > r2_at_init and 0 < r2 <= 1
    # a least-squares optimum: no small change of the weights fits better
    solved = [p.detach().clone() for p in trunk.vq_mapping.parameters()]
    for seed in range(3):
        with torch.no_grad():
            for param, value in zip(trunk.vq_mapping.parameters(), solved):
                param.copy_(value + 1e-3 * torch.randn(value.shape, generator=torch.Generator().manual_seed(seed)))
        assert _fit_error(trunk, teacher, images)[0] > error


def test_statistics_of_two_halves_sum_to_those_of_the_whole(student_and_teacher):
    student, teacher = student_and_teacher
    trunk = student.visual.trunk
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    whole = token_embedding_statistics(trunk, teacher, images)
    halves = [token_embedding_statistics(trunk, teacher, part) for part in images.split(2)]
    for name, value in whole.items():
        torch.testing.assert_close(halves[0][name] + halves[1][name], value, rtol=1e-4, atol=1e-3)


def test_a_teacher_on_another_grid_is_refused():
    student = toklip.build_toklip("tiny_32", image_size=64)  # 16x16 tokens
    teacher = Teacher("tiny_teacher_32", build_open_clip("tiny_teacher_32").state_dict())  # 8x8 patches
    with pytest.raises(ValueError, match="patch grid to be the VQ grid"):
        token_embedding_statistics(student.visual.trunk, teacher, torch.zeros(1, 3, 64, 64))


def test_align_input_without_a_teacher_is_refused_at_construction():
    with pytest.raises(ValueError, match="align_input"):
        toklip.TokLIPModule("tiny_32", teacher={"model": None}, loss={"distill_weight": 0.0}, align_input=True)
