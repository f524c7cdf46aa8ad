"""Every command block of README.md and docs/*.md runs verbatim (so the documentation cannot drift).

Convention (see the project's contributor notes): a fenced block tagged ```bash is a list of shell commands
run from the repository root, all in one bash process with ``set -euo pipefail``. An HTML comment on the
line right before the fence adjusts it for the test:

    <!-- doc-test: append="--epochs 1"; env="KEY=value OTHER=1"; replace="old=>new"; slow; skip="reason" -->

* ``append`` adds flags to every ``python ...`` line (before a trailing ``# comment``);
* ``env`` sets environment variables (space-separated ``KEY=value``);
* ``replace="old=>new"`` substitutes text in the block; it may be given several times;
* ``slow`` runs the block only under ``-m slow``; ``skip`` never runs it, for what CI hardware cannot do,
  with the reason.

Placeholders in those values: ``{fashion_mnist}`` (a small ImageFolder of Fashion-MNIST or generated
images, 28x28, 10 classes) and ``{official_swin_tiny_pth}`` (a full-size Swin-ACmix-T checkpoint in the
official format, random weights, written by tools/official_checkpoint.py).

The blocks run in a scratch copy of the repository root (each top-level entry linked), so the files they
write (runs/, data/, checkpoints) land there and never in the working tree.
"""
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from conftest import ROOT

DOC_FILES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                                   if name.endswith(".md"))
COMMENT = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*)-->\s*$")
OPTION = re.compile(r'\s*(?P<key>[a-z_]+)\s*(?:=\s*"(?P<value>[^"]*)")?\s*(?:;|$)')
KNOWN_OPTIONS = {"append", "env", "replace", "slow", "skip"}
BLOCK_TIMEOUT_S = 1200
NOT_LINKED = {".git", ".venv", "runs", "data", "output", ".pytest_cache"}


@dataclass
class DocBlock:
    """One ```bash block: where it is, its text and its doc-test options."""
    path: str
    line: int
    text: str
    append: str = ""
    env: dict = field(default_factory=dict)
    replace: list = field(default_factory=list)
    slow: bool = False
    skip: str = None

    @property
    def name(self):
        return f"{self.path}:{self.line}"


def parse_options(body, where):
    """The options of a ``doc-test:`` comment body; unknown keys and malformed text are errors."""
    options, position = {"replace": []}, 0
    body = body.strip()
    while position < len(body):
        match = OPTION.match(body, position)
        if not match or match.end() == position:
            raise ValueError(f"{where}: cannot read doc-test options at {body[position:]!r}")
        key, value = match.group("key"), match.group("value")
        if key not in KNOWN_OPTIONS:
            raise ValueError(f"{where}: unknown doc-test option {key!r} (known: {sorted(KNOWN_OPTIONS)})")
        if key in ("slow",):
            options[key] = True
        elif value is None:
            raise ValueError(f"{where}: doc-test option {key!r} needs a quoted value")
        elif key == "replace":
            if "=>" not in value:
                raise ValueError(f"{where}: replace needs 'old=>new', got {value!r}")
            options["replace"].append(tuple(value.split("=>", 1)))
        elif key == "env":
            items = shlex.split(value)
            if not all("=" in item for item in items):
                raise ValueError(f"{where}: env needs KEY=value items, got {value!r}")
            options["env"] = dict(item.split("=", 1) for item in items)
        else:
            options[key] = value
        position = match.end()
    return options


def doc_blocks(path):
    """The ```bash blocks of one Markdown file (path relative to the repository root)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            start = index
            index += 1
            body = []
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            if index == len(lines):
                raise ValueError(f"{path}:{start + 1}: unclosed ```bash block")
            options = {}
            if start > 0 and COMMENT.match(lines[start - 1]):
                options = parse_options(COMMENT.match(lines[start - 1]).group("body"), f"{path}:{start}")
            blocks.append(DocBlock(path, start + 1, "\n".join(body) + "\n", **options))
        index += 1
    return blocks


def all_blocks():
    return [block for path in DOC_FILES for block in doc_blocks(path)]


def _split_comment(line):
    """(command, ' # comment' or '') of one shell line (a '#' after whitespace starts a comment)."""
    match = re.search(r"\s#", line)
    return (line[:match.start()], line[match.start():]) if match else (line, "")


def prepare_script(block, placeholders):
    """The bash script a block runs as, with its options applied."""
    def fill(text):
        for key, value in placeholders.items():
            text = text.replace("{" + key + "}", value)
        return text

    text = block.text.replace("\\\n", " ")  # join continued lines
    for old, new in block.replace:
        if old not in text:
            raise ValueError(f"{block.name}: replace target {old!r} is not in the block")
        text = text.replace(old, fill(new))
    lines = []
    for line in text.splitlines():
        command, comment = _split_comment(line)
        if block.append and re.match(r"\s*python3?\s", command):
            command = f"{command.rstrip()} {fill(block.append)}"
        lines.append(command + comment)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def scratch_root(tmp_path):
    """A folder whose entries link to the repository's top-level entries (outputs stay in the folder)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in os.listdir(ROOT):
        if name not in NOT_LINKED and not name.endswith((".ckpt", ".mindir", ".pth")):
            os.symlink(os.path.join(ROOT, name), root / name)
    return root


@pytest.fixture(scope="session")
def official_swin_tiny_pth(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official") / "acmix_swin_tiny.pth")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "official_checkpoint.py"), "--model",
                    "swin_tiny_acmix", "--out", path], check=True, capture_output=True, timeout=900)
    return path


def _params():
    params = []
    for block in all_blocks():
        marks = []
        if block.skip:
            marks.append(pytest.mark.skip(reason=block.skip))
        if block.slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, id=block.name, marks=marks))
    return params


@pytest.mark.parametrize("block", _params())
def test_documented_commands_run(block, tmp_path, image_folder, request):
    placeholders = {"fashion_mnist": image_folder[0]}
    if "{official_swin_tiny_pth}" in str(block.replace):
        placeholders["official_swin_tiny_pth"] = request.getfixturevalue("official_swin_tiny_pth")
    script = prepare_script(block, placeholders)
    env = dict(os.environ, **{key: value.format(**placeholders) for key, value in block.env.items()})
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this Python
    result = subprocess.run(["bash", "-c", script], cwd=scratch_root(tmp_path), env=env, capture_output=True,
                            text=True, timeout=BLOCK_TIMEOUT_S)
    output = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"{block.name} failed (exit {result.returncode}):\n{script}\n--- output:\n{output}"


# ---- the harness itself -------------------------------------------------------------------------------
def test_every_bash_fence_is_collected():
    for path in DOC_FILES:
        with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
            fences = sum(1 for line in handle if line.strip() == "```bash")
        assert len(doc_blocks(path)) == fences, path
    assert len(all_blocks()) >= 4  # README quick start and use, the converter journey and real weights


def test_options_are_parsed_and_applied():
    options = parse_options(' append="--epochs 1"; env="A=1 B=\'two words\'"; replace="x=>{fashion_mnist}"; '
                            'replace="/p=>/q"; slow ', "t")
    assert options == {"append": "--epochs 1", "env": {"A": "1", "B": "two words"},
                       "replace": [("x", "{fashion_mnist}"), ("/p", "/q")], "slow": True}
    assert parse_options(' skip="needs 8 Ascend devices" ', "t") == {"replace": [], "skip": "needs 8 Ascend devices"}
    block = DocBlock("README.md", 1, "python a.py x  # note\npython3 b.py \\\n  --k /p\nbash c.sh x\n",
                     append="--n 2", replace=[("x", "{fashion_mnist}"), ("/p", "/q")])
    script = prepare_script(block, {"fashion_mnist": "/data"})
    assert script.splitlines()[1:] == ["python a.py /data --n 2 # note", "python3 b.py    --k /q --n 2",
                                       "bash c.sh /data"]
    with pytest.raises(ValueError, match="unknown doc-test option 'apend'"):
        parse_options('apend="--x"', "t")
    with pytest.raises(ValueError, match="replace target"):
        prepare_script(DocBlock("x", 1, "python a.py\n", replace=[("nothere", "y")]), {})
