"""Every toklip command in the README works when pasted: its overrides parse as Hydra reads them, and
those of a single run on toklip's own configs compose."""

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

import toklip

README = Path(__file__).resolve().parents[1] / "README.md"
TOOL_CONFIGS = {
    "toklip-train": "train", "toklip.cli.train": "train", "toklip-eval": "eval", "toklip-encode": "encode",
    "toklip.cli.encode": "encode", "toklip-cache": "cache", "toklip-convert": "convert", "toklip-make-synthetic": "make_synthetic", "toklip-demo": "demo",
    "toklip-generate": "generate", "toklip-demo-generation": "demo_generation", "toklip-ask": "ask",
    "toklip-demo-comprehension": "demo_comprehension",
}  # fmt: skip
_OPTIONS_WITH_A_VALUE = {"--config-dir", "--cfg", "--nproc_per_node", "--nnodes", "--rdzv_endpoint"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(config, arguments) of every toklip command in the README's shell blocks, continuation lines joined."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            tool = next((w for w in words if w in TOOL_CONFIGS), None)
            if tool is not None:
                commands.append((TOOL_CONFIGS[tool], words[words.index(tool) + 1 :]))
    return commands


def overrides_of(arguments: list[str]) -> list[str]:
    overrides, skip = [], False
    for word in arguments:
        if skip:
            skip = False
        elif word in _OPTIONS_WITH_A_VALUE:
            skip = True
        elif not word.startswith("-"):
            overrides.append(word)
    return overrides


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_tool():
    assert {config for config, _ in COMMANDS} == set(TOOL_CONFIGS.values())


@pytest.mark.parametrize("config, arguments", COMMANDS, ids=[" ".join(a)[:60] for _, a in COMMANDS])
def test_a_readme_command_parses_and_composes(config, arguments):
    overrides = overrides_of(arguments)
    parsed = OverridesParser.create().parse_overrides(overrides)
    if "--config-dir" in arguments or any("searchpath" in o.key_or_group for o in parsed):
        return  # configs of the user's: parsing is what can be checked here
    first_job = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line for o in parsed]
    toklip.compose_config(config, first_job)  # a sweep: its first job stands for the others
