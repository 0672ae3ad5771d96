import subprocess
import sys
from pathlib import Path

import torch

import toklip


def _run_tool(tool: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name(tool)
    return subprocess.run([str(script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=300)


def _toklip_convert(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run_tool("toklip-convert", *overrides, cwd=cwd)


def test_toklip_convert_from_the_shell(tmp_path):
    model = toklip.build_toklip("tiny_64")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "rel.pt")
    done = _toklip_convert("checkpoint=rel.pt", "released_preset=tiny_64", "out=export/tiny.safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote export/tiny.safetensors" in done.stdout
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(toklip.load_toklip(tmp_path / "export" / "tiny.safetensors").encode_image(images), model.encode_image(images))


def test_toklip_convert_names_bad_input(tmp_path):
    missing_out = _toklip_convert("checkpoint=rel.pt", "released_preset=tiny_64", cwd=tmp_path)
    assert missing_out.returncode != 0 and "Traceback" not in missing_out.stderr
    assert missing_out.stderr.strip().splitlines()[-1] == (
        "toklip-convert: required configuration keys are not set: out (set them on the command line, e.g. out=...)"
    )
    no_file = _toklip_convert("checkpoint=nowhere.pt", "released_preset=tiny_64", "out=x.safetensors", cwd=tmp_path)
    assert no_file.returncode != 0 and "checkpoint not found: nowhere.pt (from checkpoint)" in no_file.stderr


def test_toklip_convert_never_writes_over_what_it_converts(tmp_path):
    import pytest

    from toklip.config import ConfigError
    from toklip.tasks import convert

    released, earlier = tmp_path / "rel.pt", tmp_path / "rel.safetensors"
    released.write_bytes(b"a released checkpoint")
    earlier.write_bytes(b"an earlier export")
    refusals = {
        r"out=.*rel.safetensors is the checkpoint it converts": [f"checkpoint={earlier}", f"out={tmp_path / 'x' / '..' / earlier.name}"],
        r"out=.*new.pt: the export is safetensors": [f"checkpoint={released}", f"out={tmp_path / 'new.pt'}"],
        "checkpoint= must name the released TokLIP file": [f"out={tmp_path / 'new.safetensors'}"],
        "what='weights': choose released or teacher": ["what=weights", f"out={tmp_path / 'new.safetensors'}"],
    }
    for problem, overrides in refusals.items():
        with pytest.raises(ConfigError, match=problem):
            convert(toklip.compose_config("convert", ["released_preset=tiny_64", *overrides]))
    assert released.read_bytes() == b"a released checkpoint" and earlier.read_bytes() == b"an earlier export"
    assert not (tmp_path / "new.pt").exists()


def test_toklip_make_synthetic_from_the_shell_feeds_the_datamodule(tmp_path):
    overrides = [
        "out=syn",
        "train_samples=40",
        "samples_per_shard=20",
        "zeroshot_classes=[shape]",
        "zeroshot_per_class=1",
        "retrieval_images=3",
    ]
    done = _run_tool("toklip-make-synthetic", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train shards: syn/train/{000000..000001}.tar" in done.stdout
    dm = toklip.TokLIPDataModule(
        str(tmp_path / "syn/train/{000000..000001}.tar"), text_tokenizer=toklip.get_text_tokenizer("tiny_64"), image_size=64,
        train_num_samples=40, batch_size_per_device=8, num_workers=0,
        eval_sets={"shapes": {"kind": "zeroshot", "root": str(tmp_path / "syn/zeroshot")}},
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0]["image"].shape == (8, 3, 64, 64) and batches[0]["text"].shape == (8, 32)
    assert dm.eval_sets["shapes"].classnames == ["circle", "square", "triangle", "diamond", "cross", "star"]
    typo = _run_tool("toklip-make-synthetic", "out=syn2", "zeroshot_classes=[hue]", cwd=tmp_path)
    assert typo.returncode != 0 and "unknown zero-shot attribute(s) ['hue']" in typo.stderr
