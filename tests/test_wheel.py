"""A normal install (a built wheel, not `pip install -e .`) works: the configs ship inside the package.

The wheel is installed into a fresh venv outside the checkout, with `--no-deps`; the venv reaches the
dependencies through a path line to this environment's site-packages (no download, and no editable
toklip: a path line does not run that directory's .pth hooks).
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv with toklip installed from a wheel built from this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "toklip", source / "toklip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("toklip-*.whl")
    _run(sys.executable, "-m", "venv", root / "venv", cwd=root)
    python = root / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=root)
    return root / "venv" / "bin"


def test_the_wheel_ships_the_configs_and_its_tools_run(wheel_venv, tiny_teacher_checkpoint, tmp_path):
    imported = _run(wheel_venv / "python", "-c", "from toklip import *; import toklip, toklip.conf; print(toklip.__file__)", cwd=tmp_path)
    assert imported.stdout.startswith(str(wheel_venv.parent)), imported.stdout  # the wheel's toklip, not the checkout's
    job = _run(wheel_venv / "toklip-train", "experiment=tiny", "--cfg", "job", cwd=tmp_path)
    assert "preset: tiny_64" in job.stdout and "name: llamagen_tiny" in job.stdout

    small = ["data.synthetic.train_samples=128", "data.synthetic.samples_per_shard=64", "data.synthetic.retrieval_images=8",
             "data.synthetic.zeroshot_classes=[colour]", "data.synthetic.zeroshot_per_class=1", "data.batch_size_per_device=8",
             "trainer.enable_progress_bar=false"]  # fmt: skip
    _run(wheel_venv / "toklip-train", "experiment=tiny", *small, f"teacher.checkpoint={tiny_teacher_checkpoint}",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "run_name=two", cwd=tmp_path)  # fmt: skip
    export = tmp_path / "runs" / "train" / "two" / "toklip.safetensors"
    assert export.is_file()
    evaluated = _run(wheel_venv / "toklip-eval", "experiment=tiny", *small, f"checkpoint={export}", "num_workers=0", cwd=tmp_path)
    assert "zeroshot/top1" in evaluated.stdout
    encoded = _run(wheel_venv / "toklip-encode", "experiment=tiny", *small, f"checkpoint={export}",
                   f"input={tmp_path / 'data' / 'synthetic' / 'seed0_n128_px64' / 'retrieval' / 'images'}", "output=enc", cwd=tmp_path)  # fmt: skip
    assert "encoded 8 images" in encoded.stdout


@pytest.mark.slow
def test_the_wheels_demo_runs(wheel_venv, tmp_path):
    stages = "'trainer.max_steps=2','data.synthetic.train_samples=128','data.synthetic.samples_per_shard=64','data.synthetic.retrieval_images=8','data.batch_size_per_device=8','optim.warmup_steps=1'"
    _run(wheel_venv / "toklip-demo", f"stage_overrides=[{stages}]", "run_name=demo", cwd=tmp_path, timeout=900)
    assert (tmp_path / "runs" / "demo" / "demo" / "report.md").is_file()
