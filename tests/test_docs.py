"""The command lines in README.md and docs/ are accepted by the scripts they launch, flag for flag."""
import re
import shlex

import pytest

import finetune_classifier
import finetune_segmentation
import pretrain_mae
from conftest import ROOT

SCRIPTS = {"pretrain_mae.py": pretrain_mae, "finetune_classifier.py": finetune_classifier,
           "finetune_segmentation.py": finetune_segmentation}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, script, arguments) of every shell line in a ```bash block that runs one of the scripts."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                scripts = [i for i, word in enumerate(words) if word in SCRIPTS]
                if not scripts or "..." in words:  # ("..." marks a command shortened in prose)
                    continue
                found.append((path.name, words[scripts[0]], words[scripts[0] + 1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_the_main_commands():
    scripts = {script for _, script, _ in COMMANDS}
    assert scripts == set(SCRIPTS) and len(COMMANDS) >= 10


@pytest.mark.parametrize("where,script,arguments", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_a_documented_command_parses(where, script, arguments):
    args = SCRIPTS[script].parse_args(arguments)  # an unknown flag or a bad value exits with argparse's error
    if script == "pretrain_mae.py" and not args.resume_from_pretrained:
        assert pretrain_mae.resolve_defaults(args)["embed_dim"] > 0  # the sizes make a model
